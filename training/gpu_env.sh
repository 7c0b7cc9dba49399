# Sourced by the scripts for a lent GPU machine (training/gpu_run.sh, benchmarks/gpu_feed.sh) and their
# prepare steps here. That machine's image has JAX but no Keras, and nothing can be fetched there, so Keras
# and the two of its requirements it lacks travel as wheels in the ignored .whl/ (a `carry` path).

gpu_wheels() {  # here: Keras (this machine's version), namex and optree for the device's Python 3.12 into .whl/
  local keras package
  keras=$(python3 -c "import keras; print(keras.__version__)") || return 1
  mkdir -p .whl
  for package in "keras==$keras" "namex==0.1.0" "optree==0.20.0"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$package" || return 1
  done
}

gpu_setup() {  # there: install $WHEELS if Keras is missing, put the checkout on PYTHONPATH, show the GPU and Keras
  if [ -n "${WHEELS:-}" ] && ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || return 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import os, keras; print('keras', keras.__version__, keras.backend.backend(), os.cpu_count(), 'cores')"
}
