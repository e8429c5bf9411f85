#!/usr/bin/env bash
# The PyTorch peer of the ResNet image tower (scripts/torch_peer.py): installs torch into the
# git-ignored .venv-torch on first use, then passes every argument on. A benchmark and
# debugging reference only; plipd never needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-torch
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, PIL, numpy" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch numpy pillow
fi
exec "$VENV/bin/python" scripts/torch_peer.py "$@"
