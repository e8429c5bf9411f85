#!/usr/bin/env bash
# The ReID index benchmark: plipd's exact cosine top-10 next to FAISS IndexFlatIP (faiss-cpu
# from PyPI, installed into a git-ignored virtual environment) on the same vectors, at gallery
# sizes 10k and 100k (the tiny preset's 256-wide embeddings). One JSON line per size.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q faiss-cpu numpy
fi
cargo build --release -q -p plip-actors
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for n in 10000 100000; do
  ours=$("${CARGO_TARGET_DIR:-target}"/release/plipd bench search --gallery "$n" --queries 500 --batch 64 --dump "$tmp/v.bin")
  peer=$("$VENV/bin/python" scripts/bench_faiss.py "$tmp/v.bin" 64 10)
  python3 - "$ours" "$peer" <<'PY'
import json, sys
o, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"gallery": o["gallery"], "dim": o["dim"], "plipd": o, "faiss": p,
                  "ratio_single": o["single_qps"] / p["single_qps"],
                  "ratio_batched": o["batched_qps"] / p["batched_qps"]}))
PY
done
