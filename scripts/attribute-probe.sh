#!/usr/bin/env bash
# The attribute probe (README "Quality"): for a trained state folder, how well a linear reader of
# the true attributes finds held-out people in the model's image space, beside the text tower.
#   scripts/attribute-probe.sh DATA STATE [pooled|neck]
# DATA is a `plipd synth` folder; numpy comes from PyPI into a git-ignored virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$1 state=$2 part=${3:-neck}
VENV=.venv-probe
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy
fi
plipd=${PLIPD:-${CARGO_TARGET_DIR:-target}/release/plipd}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" scripts/attribute_probe.py split "$data" "$tmp/train-people" >&2
"$plipd" eval --data "$tmp/train-people" --state "$state" --joint-feature both --report "$tmp" \
  --embeddings "$tmp/train.jsonl" > /dev/null
"$plipd" eval --data "$data" --state "$state" --joint-feature both --report "$tmp" \
  --embeddings "$tmp/test.jsonl" > /dev/null
"$VENV/bin/python" scripts/attribute_probe.py probe "$tmp/train.jsonl" "$tmp/test.jsonl" "$part"
