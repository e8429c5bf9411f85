#!/usr/bin/env bash
# Runs scripts/torchvision_check.py with torch and torchvision from the git-ignored .venv-torch
# (installed on first use, as scripts/torch-peer.sh does). A check of the exported weights'
# layout only; plipd never needs PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-torch
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, torchvision, safetensors, PIL, numpy" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch torchvision numpy pillow safetensors
fi
exec "$VENV/bin/python" scripts/torchvision_check.py "$@"
