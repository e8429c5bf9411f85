"""The `tiny` tower's training step in PyTorch, counted and timed: the floating-point
operations of one forward and backward at batch 64 (torch.utils.flop_counter), their time,
and torch.mm on the same matrix shapes as `model/examples/gemm_rate.rs`. One JSON line each.

Usage: .venv-torch/bin/python scripts/tower_flops.py [threads]  (scripts/torch-peer.sh
installs the venv)
"""
import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, "scripts")
import torch_peer  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
model = torch_peer.Tower([48, 96, 192, 384], [2, 2, 2, 2], [1, 2, 2, 1], 384)
x = torch.randn(64, 3, 128, 64)
with FlopCounterMode(display=False) as fc:
    model(x, pooled=True).sum().backward()
times = []
for _ in range(5):
    t = time.time()
    model.zero_grad()
    model(x, pooled=True).sum().backward()
    times.append(time.time() - t)
best = min(times)
gflop = fc.get_total_flops() / 1e9
print(json.dumps({"bench": "tower_flops", "gflop_forward_backward": round(gflop, 1),
                  "best_ms": round(best * 1e3, 1), "gflop_per_s": round(gflop / best, 1),
                  "threads": threads, "torch": torch.__version__}))
shapes = [
    ("layer1 forward", 32768, 48, 432, False),
    ("layer1 input gradient", 32768, 432, 48, False),
    ("layer1 weight gradient", 48, 432, 32768, True),
    ("layer4 forward", 2048, 384, 3456, False),
    ("layer4 input gradient", 2048, 3456, 384, False),
    ("layer4 weight gradient", 384, 3456, 2048, True),
]
for what, m, n, k, transposed in shapes:
    a = torch.randn(k, m).t() if transposed else torch.randn(m, k)
    b = torch.randn(k, n)
    best = float("inf")
    for _ in range(5):
        t = time.time()
        torch.mm(a, b)
        best = min(best, time.time() - t)
    print(json.dumps({"bench": "torch_mm", "what": what, "m": m, "n": n, "k": k,
                      "threads": threads, "ms": round(best * 1e3, 1),
                      "gflop_per_s": round(2 * m * n * k / best / 1e9, 1)}))
