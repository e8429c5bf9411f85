"""FAISS IndexFlatIP on the vectors `plipd bench search --dump FILE` wrote: the peer of the
ReID index benchmark. Prints one JSON line (single and batched queries per second)."""
import json
import sys
import time

import faiss
import numpy as np

path, batch, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "rb") as f:
    n, q, d = np.frombuffer(f.read(24), dtype="<u8")
    data = np.frombuffer(f.read(), dtype="<f4")
gallery = data[: n * d].reshape(n, d).copy()
queries = data[n * d :].reshape(q, d).copy()
index = faiss.IndexFlatIP(int(d))
index.add(gallery)
index.search(queries[:1], k)
t = time.perf_counter()
for i in range(q):
    index.search(queries[i : i + 1], k)
single = q / (time.perf_counter() - t)
t = time.perf_counter()
for i in range(0, q, batch):
    index.search(queries[i : i + batch], k)
batched = q / (time.perf_counter() - t)
print(json.dumps({"peer": "faiss.IndexFlatIP", "faiss": faiss.__version__, "gallery": int(n),
                  "threads": faiss.omp_get_max_threads(), "single_qps": single, "batched_qps": batched}))
