#!/bin/bash
# Issue #20 on a GPU host, in one device call of under 10 minutes: does the process feed bring end-to-end within
# 80% of model-only, and how does decoding scale with the host's cores? Written for the lent 16-core H100/H200
# with JAX and no TensorFlow (KERAS_BACKEND=jax). Needs no shipped weights: it builds the reference workload
# (InceptionV3 299x299 + DenseNet201 224x224, random weights; throughput does not depend on weight values).
#
# Here, once:   bash benchmarks/gpu_feed.sh prepare
#   .whl/ gets Keras, namex and optree for the machine's Python 3.12 (its image lacks them), .gpu-data/sample600/
#   the 124 originals at 600x450 (31 MB); both are ignored by git. The tracked models (~160 MB) would push the
#   tree over the tool's 64 MiB: move them out for the call and back after (the prepare step prints how).
# Then:         run(command="WHEELS=.whl bash benchmarks/gpu_feed.sh", carry=[".whl", ".gpu-data"], timeout_s=600)
#   $OUT/bench.txt (and bench-*.txt per setting) come back; put the figures in docs/feeding.md.
#
# What it runs (each `dermscore bench` in one process, 3 rounds; skipped when LIMIT seconds would be passed):
#   1. --feed process at batch $BATCH (128, the best H200 batch in docs/throughput.md), with the decode-scaling
#      table (1, 2, 4, 8, 16 workers; processes and threads);
#   2. --feed thread at the same batch: today's path, the baseline, in the same call;
#   3. --feed process at batch 64 (the GPU default).
# Env: OUT, W (work folder), IMAGES, BATCH (128), N (images per measurement, 1024), ROUNDS (3), LIMIT (seconds,
# 540), WHEELS; SMOKE=1: tiny members (75x75, 32x32), 16 images, batch 4, one round, for the CPU
# (KERAS_BACKEND=tensorflow there; tests/test_feed.py runs it).
set -u
cd "$(dirname "$0")/.."
. training/gpu_env.sh
if [ "${1:-}" = prepare ]; then
  gpu_wheels || exit 1
  mkdir -p .gpu-data
  [ -d .gpu-data/sample600 ] || cp -r ../shared/data/ham10000-600x450-sample/images .gpu-data/sample600
  du -sh .whl .gpu-data
  echo "Before the call:  mkdir -p /tmp/keep-models && mv models/*/*.keras models/*/*.onnx /tmp/keep-models/"
  echo "After it:         git checkout -- models"
  exit 0
fi
export PYTHONUNBUFFERED=1 KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
T0=$(date +%s)
W=${W:-/tmp/gpu-feed}
OUT=${OUT:-$W/out}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$W/jax-cache}  # later benches reuse the compiled members
mkdir -p "$W" "$OUT"
if [ -d .gpu-data/sample600 ]; then IMAGES=${IMAGES:-.gpu-data/sample600}; else IMAGES=${IMAGES:-../shared/data/ham10000-600x450-sample/images}; fi
BATCH=${BATCH:-128}; N=${N:-1024}; ROUNDS=${ROUNDS:-3}; LIMIT=${LIMIT:-540}; SIZES="299 224"; EXTRA=""
if [ "${SMOKE:-0}" = 1 ]; then
  BATCH=4; N=16; ROUNDS=1; SIZES="75 32"; EXTRA="--backend keras --naive-images 2"
fi
gpu_setup || exit 1
# The ring at batch 128 needs about 650 MB of /dev/shm; a small tmpfs there (a container's 64 MB) is enlarged
# rather than the call wasted (the machine is ours alone and given back after).
if [ "${SMOKE:-0}" != 1 ] && [ "$(df --output=avail -k /dev/shm | tail -1)" -lt 4000000 ] && [ "$(id -u)" = 0 ]; then
  mount -o remount,size=16g /dev/shm || echo "could not enlarge /dev/shm"
fi
df -h /dev/shm | tail -1
python3 benchmarks/random_weights_bundle.py "$W/bundle" $SIZES >/dev/null || exit 1
echo "bundle built at $(( $(date +%s) - T0 )) s"

bench() {  # name, then bench options; skipped if the last one's duration would pass LIMIT
  local name=$1 started elapsed
  shift
  started=$(date +%s)
  elapsed=$(( started - T0 ))
  if [ -n "${LAST:-}" ] && [ $(( elapsed + LAST )) -gt "$LIMIT" ]; then
    echo "skipped $name: $elapsed s gone, the last bench took $LAST s, limit $LIMIT s" | tee -a "$OUT/bench.txt"
    return 0
  fi
  echo "== $name: dermscore bench $IMAGES --model BUNDLE --images $N --rounds $ROUNDS $EXTRA $*" | tee -a "$OUT/bench.txt"
  python3 -m dermscore.cli bench "$IMAGES" --model "$W/bundle" --images "$N" --rounds "$ROUNDS" $EXTRA "$@" \
    >"$OUT/bench-$name.txt" 2>"$W/bench-$name.err" || { tail -20 "$W/bench-$name.err"; exit 1; }
  cat "$OUT/bench-$name.txt" | tee -a "$OUT/bench.txt"
  LAST=$(( $(date +%s) - started ))
  echo "($name took $LAST s)" | tee -a "$OUT/bench.txt"
}
bench "process-$BATCH" --batch-size "$BATCH" --feed process
bench "thread-$BATCH" --batch-size "$BATCH" --feed thread --no-decode-scaling
[ "${SMOKE:-0}" = 1 ] || bench process-64 --batch-size 64 --feed process --no-decode-scaling
echo "done in $(( $(date +%s) - T0 )) s"
