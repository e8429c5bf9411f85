#!/usr/bin/env bash
# The training benchmark: full PLIP steps (IVLC + IAP + TIC) of the `tiny` preset at batch 64,
# with an IVLC-only peer measured in the same run. Prints one JSON line; extra arguments are
# passed to `plipd bench train` (e.g. --threads 1, --preset small, --batch 32).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p plip-actors --bin plipd
exec "${CARGO_TARGET_DIR:-target}"/release/plipd bench train --preset tiny --batch 64 --steps 10 "$@"
