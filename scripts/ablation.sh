#!/usr/bin/env bash
# The paper's ablation on the CPU preset (README "Quality", "The ablation"): one equal budget
# per row — `tiny`, batch 64, STEPS steps (default 100 = 6,400 images), the same seed and data —
# with the pretext tasks and the identity losses switched on row by row; the attribute head is
# off in every row, so each row shows what its tasks alone add. Prints one JSON line per row
# with the last evaluation (image Rank-1 / mAP, text→image R@1).
#   scripts/ablation.sh DATA OUTDIR [STEPS]
# DATA is a `plipd synth` folder; each row's state folder and log go under OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$1 out=$2 steps=${3:-100}
plipd=${PLIPD:-${CARGO_TARGET_DIR:-target}/release/plipd}
mkdir -p "$out"
# name|IVLC IAP TIC identity-losses (triplet, image ID, caption ID)
rows=(
  "ivlc|1 0 0 0"
  "ivlc+iap|1 1 0 0"
  "ivlc+tic|1 0 1 0"
  "ivlc+iap+tic|1 1 1 0"
  "ivlc+iap+tic+id|1 1 1 1"
  "id|0 0 0 1"
)
for row in "${rows[@]}"; do
  name=${row%%|*}
  read -r ivlc iap tic ids <<< "${row#*|}"
  dir="$out/$name"
  if [ ! -f "$dir.log" ] || ! grep -q '"eval"' "$dir.log"; then
    rm -rf "$dir"
    "$plipd" train --data "$data" --state "$dir" --preset tiny --steps "$steps" \
      --eval-every "$steps" --ramp-steps "$steps" --report "$dir-report" \
      --w-ivlc "$ivlc" --w-iap "$iap" --w-tic "$tic" \
      --w-triplet "$ids" --w-id "$ids" --w-text-id "$ids" --w-attr 0 --w-text-attr 0 \
      > "$dir.log" 2>&1
  fi
  grep '"eval"' "$dir.log" | tail -1 | sed "s/^{/{\"row\":\"$name\",/"
done
