#!/bin/bash
# One GPU run of the issue-#15 recipe (--preset shift-gpu: both members at 150x200, Shades of Gray, 8 rotations/
# flips, crops, white balance / gamma / blur, EMA) under KERAS_BACKEND=jax, in under 10 minutes, then the
# weights back in pieces the device tool accepts (files <= 16 MB, <= 8 files and 64 MiB per call).
#
#   bash training/gpu_run.sh          # train, store float16 in 15 MB parts, group 1 (DenseNet201 + meta) -> $OUT
#   bash training/gpu_run.sh fetch 2  # a second call on the still-warm machine: group 2 (InceptionV3) -> $OUT
#   bash training/gpu_run.sh fetch 3  # optional: group 3 (the member trained without HELDOUT)
# Back here: bash training/gpu_unpack.sh FILES_AT WORK (reassembles, checks sha256, restores the run's files),
# then ensemble / evaluate / export on the CPU (training/README.md, "On a GPU").
#
# Timeline (seconds from the start, defaults): setup ~40; DenseNet201 starts alone and compiles (it took 345 s
# sharing the GPU on 2026-11-26); once its first epoch is logged (or after WAIT_DN s) InceptionV3 and, with
# HELDOUT set, InceptionV3 without that source start beside it; every trainer stops by STOP minutes with the
# epoch count fitted to its budget; then float16 parts, and with the time left before LIMIT s: the ensemble fit,
# evaluate (per source, device-shifted copy) and the held-out-source evaluation, whose files join meta.tgz.
#
# Env: DATA (HAM10000 200x150 copy; default .gpu-data/ham10000-200x150 if carried, else ../shared/...),
# W (work dir, fixed so `fetch` finds it), OUT, WHEELS (wheel folder to install first), STOP (minutes, 8.0),
# LIMIT (seconds for the whole run, 560), WAIT_DN (seconds, 300), HELDOUT (source left out, rosendahl;
# empty: no third run), HELDOUT_MEMBER (inceptionv3), PRESET (shift-gpu), EXTRA (more train args),
# PART_SIZE (split size, 15m), SMOKE=1 (a dry run of every step on tiny settings, for the CPU: use it with
# KERAS_BACKEND=tensorflow, as JAX runs DenseNet201 eagerly op by op; tests/test_gpu_run.py).
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
W=${W:-/tmp/tw}
# Compiled XLA programs are reused by the later processes (ensemble, evaluate) instead of compiled again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$W/jax-cache}
OUT=${OUT:-$W/out}
mkdir -p "$OUT"

ship() {  # copy one group of files (weights parts, meta) into $OUT
  cp "$W"/ship/group"$1"/* "$OUT"/ 2>/dev/null
  ls -la "$OUT"
}
if [ "${1:-}" = fetch ]; then
  ship "$2"
  exit 0
fi

T0=$(date +%s)
if [ -d .gpu-data/ham10000-200x150 ]; then D=${DATA:-.gpu-data/ham10000-200x150}; else D=${DATA:-../shared/data/ham10000-200x150}; fi
STOP=${STOP:-8.0}
LIMIT=${LIMIT:-560}
WAIT_DN=${WAIT_DN:-300}
HELDOUT=${HELDOUT-rosendahl}
HELDOUT_MEMBER=${HELDOUT_MEMBER:-inceptionv3}
PRESET=${PRESET:-shift-gpu}
EXTRA=${EXTRA:-}
PART_SIZE=${PART_SIZE:-15m}
if [ "${SMOKE:-0}" = 1 ]; then  # every step on the CPU: tiny inputs, two steps, one epoch (about 6 min here)
  EXTRA="$EXTRA --input-size 75x75 --batch-size 8 --steps-per-epoch 2 --epochs 1 --eager --no-mixed-precision"
fi
. "$(dirname "$0")/gpu_env.sh"
gpu_setup || exit 1
COMMON="--data $D --work $W --preset $PRESET"
# Index, split, then one shared image cache at the training size, built before the trainers start; in one process,
# as each python3 that imports Keras costs seconds of the budget.
python3 -c "
import contextlib, os
from training import cli, steps
common = '$COMMON'.split()
with open(os.devnull, 'w') as quiet, contextlib.redirect_stdout(quiet):
    code = cli.main(['index', *common])
code = code or cli.main(['split', *common])
if code:
    raise SystemExit(code)
a = cli.parse(['train', *common, *'$EXTRA'.split()])
steps.member_run(a, 'inceptionv3')
" || exit 1
sha256sum "$W"/split.csv
DEADLINE=$(( T0 + ${STOP%.*} * 60 + 60 * ${STOP#*.} / 10 ))
STOP_AT=$(date -u -d "@$DEADLINE" +%H:%M:%S)
echo "setup $(( $(date +%s) - T0 )) s; stop-at $STOP_AT UTC"

train() {  # member, log name, extra args; the time budget runs to the deadline less 20 s
  local budget
  budget=$(python3 -c "print(max(($DEADLINE - $(date +%s) - 20) / 60, 0.5))")
  echo "start $2 at $(( $(date +%s) - T0 )) s, budget $budget min"
  python3 -m training train $COMMON --member "$1" --time-budget "$budget" --stop-at "$STOP_AT" $EXTRA ${@:3} \
    >"$W/train-$2.log" 2>&1 &
}
train densenet201 densenet201
# DenseNet201 compiles alone: the others start once its first epoch is logged (or it ended, or WAIT_DN passed).
while [ ! -s "$W/members/densenet201/history.csv" ] && [ -n "$(jobs -r)" ] && [ $(( $(date +%s) - T0 )) -lt "$WAIT_DN" ]; do
  sleep 2
done
echo "densenet201 first epoch after $(( $(date +%s) - T0 )) s"
train inceptionv3 inceptionv3
[ -n "$HELDOUT" ] && train "$HELDOUT_MEMBER" "$HELDOUT_MEMBER-without-$HELDOUT" --exclude-source "$HELDOUT"
i=0
while [ -n "$(jobs -r)" ]; do
  sleep 3; i=$((i+1)); [ $((i % 15)) -eq 0 ] || continue
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  for f in "$W"/train-*.log; do echo "$(basename "$f"): $(tail -n1 "$f" | cut -c1-200)"; done
done
wait
echo "training done $(( $(date +%s) - T0 )) s"

# float16 copies of each best.keras in parts; group 1: DenseNet201 + meta, 2: InceptionV3, 3: the held-out run.
rm -rf "$W/ship" && mkdir -p "$W/ship/group1" "$W/ship/group2" "$W/ship/group3"
MEMBERS="densenet201 inceptionv3 ${HELDOUT:+$HELDOUT_MEMBER-without-$HELDOUT}"
trained=""
for m in $MEMBERS; do
  if [ -f "$W/members/$m/best.keras" ]; then
    cp "$W/members/$m/best.keras" "$W/$m.keras" || exit 1
    trained="$trained $W/$m.keras"
  fi
done
# All in one process (each python3 that imports Keras costs seconds).
[ -z "$trained" ] || python3 -c "
import sys; from pathlib import Path; from training.export import store_float16
for file in sys.argv[1:]: store_float16(Path(file))" $trained || exit 1
group=1
for m in $MEMBERS; do
  grep -h "time budget\|deadline\|Error\|error" "$W/train-$m.log" | tail -5
  tail -n2 "$W/members/$m/history.csv" 2>/dev/null
  if [ -f "$W/members/$m/best.keras" ]; then
    (cd "$W" && sha256sum "$m.keras" >> "$W/ship/group1/SHA256SUMS")
    (cd "$W/ship/group$group" && split -b "$PART_SIZE" -a 3 -d "$W/$m.keras" "$m.keras.part")
  else
    echo "$m: no best.keras (see $W/train-$m.log)"; tail -n 20 "$W/train-$m.log"
  fi
  group=$((group + 1))
done
meta() {  # the run's small files: histories, configs, machines, logs, and whatever the later steps wrote
  (cd "$W" && tar czf "$W/ship/group1/meta.tgz" split.csv index_problems.csv train-*.log \
    $(ls -d members/*/{history.csv,state.json,config.json,command.txt,machine.json} members/*/predictions*.npz \
      ensemble.json evaluation *.log 2>/dev/null | sort -u))
  cp "$W/ship/group1/meta.tgz" "$W/ship/group1/SHA256SUMS" "$OUT"/
}
meta
ship 1
# With the time left: fit the ensemble (flip TTA as shipped), evaluate (per source, device shift) and the held-out
# source, on the GPU; each step's files join meta.tgz as soon as it ends.
for step in "ensemble --tta" "evaluate --tta" ${HELDOUT:+"evaluate --exclude-source $HELDOUT --member $HELDOUT_MEMBER"}; do
  LEFT=$(( LIMIT - ($(date +%s) - T0) ))
  echo "$step: $LEFT s left"
  [ "$LEFT" -gt 20 ] || break
  name=$(echo "$step" | tr ' ' '_' | tr -d '-')
  timeout "$LEFT" python3 -m training $step $COMMON $EXTRA > "$W/$name.log" 2>&1
  tail -n 3 "$W/$name.log"
  meta
done
ls -la "$OUT"
echo "all done $(( $(date +%s) - T0 )) s"
