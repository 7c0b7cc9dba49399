#!/bin/bash
# Here, before a GPU session's run of training/gpu_run.sh: what the device machine lacks travels with the tree.
#   bash training/gpu_prepare.sh
# * .whl/: Keras and the two of its requirements the machine's image lacks (namex, optree), for its Python 3.12;
# * .gpu-data/ham10000-200x150: the data (47 MB; ../shared beside the checkout does not travel).
# Both are ignored by git, so the run names them in `carry`. The tree that travels is limited to 64 MiB and the
# shipped bundle's .keras and .onnx files (160 MB) are tracked: move them out of the tree for the call and back after
# (the script prints how). Then, with the device tool:
#   run(command="WHEELS=.whl bash training/gpu_run.sh", carry=[".whl", ".gpu-data"], timeout_s=600)
#   run(command="bash training/gpu_run.sh fetch 2")   # at once: the machine stays warm only 30 s
#   bash training/gpu_unpack.sh training-work-gpu FILES_AT_OF_CALL_1 FILES_AT_OF_CALL_2
set -eu
cd "$(dirname "$0")/.."
. training/gpu_env.sh
gpu_wheels
mkdir -p .gpu-data
[ -d .gpu-data/ham10000-200x150 ] || cp -r ../shared/data/ham10000-200x150 .gpu-data/
ls -la .whl; du -sh .gpu-data
echo "Before the call:  mkdir -p /tmp/keep-models && mv models/*/*.keras models/*/*.onnx /tmp/keep-models/ (the tree must stay under 64 MiB)"
echo "After the calls:  git checkout -- models   (or move them back)"
