#!/bin/bash
# Back from training/gpu_run.sh: bash training/gpu_unpack.sh WORK FILES_AT [FILES_AT ...]
# Reassembles each member's float16 parts into WORK/members/<member>/best.keras (checking the sha256 the GPU run
# recorded), restores the run's small files (histories, configs, machine.json, logs, predictions, evaluation) from
# meta.tgz, and marks the GPU's predictions as current for these weights. Then, on the CPU:
#   python -m training ensemble --work WORK --tta && python -m training evaluate --work WORK && \
#   python -m training export --work WORK --tta --out models/NAME
set -eu
W=$1; shift
mkdir -p "$W"
for F in "$@"; do
  if [ -f "$F/meta.tgz" ]; then tar xzf "$F/meta.tgz" -C "$W"; fi
  if [ -f "$F/SHA256SUMS" ]; then cat "$F/SHA256SUMS" >> "$W/.sha256sums"; fi
done
for F in "$@"; do
  for first in "$F"/*.keras.part000; do
    [ -e "$first" ] || continue
    name=$(basename "$first" .part000)
    cat "$F/$name".part* > "$W/$name"
    (cd "$W" && grep " $name\$" .sha256sums | sort -u | sha256sum -c -)
    mkdir -p "$W/members/${name%.keras}"
    mv "$W/$name" "$W/members/${name%.keras}/best.keras"
    # The run's predictions (float32, from these weights before float16 storage) stay valid: newer than best.keras.
    touch "$W/members/${name%.keras}"/predictions*.npz 2>/dev/null || true
  done
done
rm -f "$W/.sha256sums"
ls -la "$W"/members/*/best.keras
