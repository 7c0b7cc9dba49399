#!/bin/bash
# Both members at once on one GPU under any Keras backend (the shipped InceptionV3 came from this script
# on an H200 with KERAS_BACKEND=jax; see training/README.md "On a GPU"). Each best.keras comes back as
# float16, split into 15 MB parts under $OUT (default WORK/out) for machines whose transfers cap file size;
# reassemble with `cat M.keras.part* > WORK/members/M/best.keras`, then run ensemble/evaluate/export.
# Env: BUDGET (minutes per member), STOP (minutes from now: hard stop), LIMIT (seconds for the whole
# script, for the optional on-GPU ensemble predictions), EXTRA (extra train args), W (work dir),
# DATA (folder with HAM10000_metadata.csv and images/), WHEELS (folder of wheels to install first, optional).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
BUDGET=${BUDGET:-7}
STOP=${STOP:-8.3}
EXTRA=${EXTRA:-}
W=${W:-/tmp/tw}
D=${DATA:-../shared/data/ham10000-200x150}
OUT=${OUT:-$W/out}
mkdir -p $OUT
if [ -n "${WHEELS:-}" ] && ! python3 -c "import keras" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import keras; print('keras', keras.__version__, keras.backend.backend())"
python3 -m training index --data $D --work $W && python3 -m training split --data $D --work $W || exit 1
sha256sum $W/split.csv
# One shared image cache (150x200), built before the two trainers start.
python3 -c "
import sys; from pathlib import Path
from training import cli, steps
a = cli._parser().parse_args(['train', '--data', '$D', '--work', '$W', '--preset', 'scratch-gpu'] + '$EXTRA'.split())
a.metadata = a.data / 'HAM10000_metadata.csv'
steps.member_run(a, 'inceptionv3')
" || exit 1
STOP_AT=$(date -u -d "@$(( $(date +%s) + ${STOP%.*} * 60 + 60 * ${STOP#*.} / 10 ))" +%H:%M)
echo "setup $(( $(date +%s) - T0 )) s; stop-at $STOP_AT UTC; budget $BUDGET min"
for m in densenet201 inceptionv3; do
  python3 -m training train --data $D --work $W --preset scratch-gpu --member $m --time-budget $BUDGET \
    --stop-at $STOP_AT $EXTRA > $W/train-$m.log 2>&1 &
  sleep 2
done
i=0
while [ -n "$(jobs -r)" ]; do
  sleep 3; i=$((i+1)); [ $((i % 15)) -eq 0 ] || continue; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  for f in $W/train-*.log; do tail -n1 $f | cut -c1-230; done
done
wait
echo "training done $(( $(date +%s) - T0 )) s"
for m in inceptionv3 densenet201; do
  grep -h "time budget\|deadline\|Error\|error" $W/train-$m.log | tail -5
  tail -n3 $W/members/$m/history.csv
  cp $W/members/$m/best.keras $W/$m.keras && python3 -c "
from pathlib import Path; from training.export import store_float16; store_float16(Path('$W/$m.keras'))"
  ls -la $W/$m.keras; sha256sum $W/$m.keras
  mkdir -p $W/ship/$m && (cd $W/ship/$m && split -b 15m -d $W/$m.keras $m.keras.part)
done
cp $W/ship/*/* $OUT/
META="members/inceptionv3/history.csv members/inceptionv3/state.json members/inceptionv3/config.json
  members/inceptionv3/command.txt members/inceptionv3/machine.json members/densenet201/history.csv members/densenet201/state.json
  members/densenet201/config.json members/densenet201/command.txt members/densenet201/machine.json split.csv index_problems.csv
  train-inceptionv3.log train-densenet201.log"
tar czf $OUT/meta.tgz -C $W $META
# Validation/test predictions (float32, 4 flip views) for the ensemble fit, on the GPU while time is left.
LEFT=$(( ${LIMIT:-560} - ($(date +%s) - T0) ))
echo "ensemble step with $LEFT s left"
if [ $LEFT -gt 20 ]; then
  timeout $LEFT python3 -m training ensemble --data $D --work $W --preset scratch-gpu $EXTRA > $W/ensemble.log 2>&1
  tail -n 3 $W/ensemble.log
  tar czf $OUT/meta.tgz -C $W $META ensemble.log $(cd $W && ls members/*/predictions.npz ensemble.json 2>/dev/null)
fi
ls -la $OUT
echo "all done $(( $(date +%s) - T0 )) s"
