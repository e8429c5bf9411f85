#!/usr/bin/env bash
# The second split (README "Quality", "A second split"): today's defaults trained and evaluated
# within the default split (`plipd synth`, seed 7, difficulty 0.7) and within another (seed
# 2027, difficulty 0.9: its own people, renderings and harder scenes), at one budget (STEPS
# steps of 64 images); then each model evaluated on the other split's query/gallery (the
# cross-rendering figures), with its stored BNNeck statistics and with the statistics
# re-estimated on the other split's unlabelled training images. One JSON line per evaluation.
#   scripts/second-split.sh OUTDIR [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 steps=${2:-200}
plipd=${PLIPD:-${CARGO_TARGET_DIR:-target}/release/plipd}
mkdir -p "$out"
[ -d "$out/split-a" ] || "$plipd" synth --out "$out/split-a" > /dev/null
[ -d "$out/split-b" ] || "$plipd" synth --out "$out/split-b" --seed 2027 --difficulty 0.9 > /dev/null
for s in a b; do
  if [ ! -f "$out/train-$s.log" ] || ! grep -q '"eval"' "$out/train-$s.log"; then
    rm -rf "$out/state-$s"
    "$plipd" train --data "$out/split-$s" --state "$out/state-$s" --preset tiny --steps "$steps" \
      --eval-every "$steps" --report "$out/report-$s" > "$out/train-$s.log" 2>&1
  fi
done
row() { sed "s/^{/{\"trained_on\":\"$1\",\"evaluated_on\":\"$2\",\"neck\":\"$3\",/"; }
for s in a b; do
  o=$([ $s = a ] && echo b || echo a)
  "$plipd" eval --data "$out/split-$s" --state "$out/state-$s" --report "$out/report-$s" | row $s $s stored
  "$plipd" eval --data "$out/split-$o" --state "$out/state-$s" --report "$out/report-$s" | row $s $o stored
  "$plipd" eval --data "$out/split-$o" --state "$out/state-$s" --report "$out/report-$s" \
    --calibrate-neck 512 | row $s $o "recalibrated on $o"
done
