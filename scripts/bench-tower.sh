#!/usr/bin/env bash
# The ResNet image tower's training step against its PyTorch peer, measured in the same run:
# `plipd bench train --torch-peer` on the image losses only (triplet + SupCon, no text tower)
# and scripts/torch_peer.py --bench (the same network, losses, batch and thread count; PyTorch
# installed into the git-ignored .venv-torch on first use). Prints plipd's JSON line with
# `peer_pytorch_median_step_ms` and `ratio_to_pytorch`.
# Usage: [STEPS=5] [THREADS=2] scripts/bench-tower.sh [other plipd bench train options]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p plip-actors --bin plipd
exec "${CARGO_TARGET_DIR:-target}"/release/plipd bench train --preset tiny --batch 64 \
  --steps "${STEPS:-5}" --threads "${THREADS:-2}" --warmup 1 --no-peer --tasks triplet,supcon \
  --torch-peer "$@"
