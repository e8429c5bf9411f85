#!/usr/bin/env bash
# The ResNet image tower's training step against its PyTorch peer, measured in the same run:
# plipd bench train on the image losses only (triplet + SupCon, no text tower) and
# scripts/torch_peer.py --bench (the same network, losses, batch and thread count; PyTorch
# installed into the git-ignored .venv-torch on first use). Prints one JSON line with the ratio.
# Usage: scripts/bench-tower.sh [--steps N] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=5
THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release -q -p plip-actors --bin plipd
ours=$("${CARGO_TARGET_DIR:-target}"/release/plipd bench train --preset tiny --batch 64 \
  --steps "$STEPS" --warmup 1 --threads "$THREADS" --no-peer --tasks triplet,supcon 2>/dev/null | tail -1)
peer=$(scripts/torch-peer.sh --data unused --bench "$STEPS" --threads "$THREADS" | tail -1)
python3 - "$ours" "$peer" <<'PY'
import json, sys
o, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"bench": "tower", "preset": o["preset"], "batch": o["batch"], "threads": o["threads"],
                  "tasks": o["tasks"], "plipd_step_ms": o["median_step_ms"],
                  "pytorch_step_ms": round(p["median_step_ms"], 1),
                  "ratio_plipd_to_pytorch": round(o["median_step_ms"] / p["median_step_ms"], 2)}))
PY
