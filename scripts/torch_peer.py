#!/usr/bin/env python3
"""PyTorch peer of plipd's ResNet image tower and identity-level image losses.

A debugging and benchmark reference, never a runtime dependency: the same network as the
`tiny` preset's image tower (channels, blocks, strides, zero-γ last BatchNorm, Kaiming fan-out
initialisation), the same batch-hard triplet and supervised contrast on the L2-normalised joint
embedding, the same augmentation, AdamW, warm-up + cosine, P×K sampler; evaluated with the
Market-1501 protocol on query/ vs bounding_box_test/. Prints one JSON line per evaluation.

  scripts/torch-peer.sh --data data/synth --steps 200 --eval-every 100
"""
import argparse, glob, json, math, os, random, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ZERO_GAMMA = False
MEAN = np.array([0.357, 0.323, 0.328], np.float32)
STD = np.array([0.252, 0.242, 0.239], np.float32)


def load_folder(folder, h, w):
    xs, pids, cams = [], [], []
    for f in sorted(glob.glob(os.path.join(folder, "*.jpg"))):
        name = os.path.basename(f)
        pid, rest = name.split("_", 1)
        if pid.startswith("-"):
            continue
        img = Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR)
        xs.append(np.asarray(img, np.uint8))
        pids.append(int(pid))
        cams.append(int(rest[1:rest.index("s")]))
    return np.stack(xs), np.array(pids), np.array(cams)


def normalise(u8):
    x = (u8.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def augment(u8, rng, flip=0.5, pad_frac=0.125, erase=0.5):
    n, h, w, _ = u8.shape
    pad = int(round(pad_frac * w))
    fill = np.round(MEAN * 255).astype(np.uint8)
    out = np.empty_like(u8)
    for i in range(n):
        im = u8[i]
        if rng.random() < flip:
            im = im[:, ::-1]
        if pad > 0:
            padded = np.empty((h + 2 * pad, w + 2 * pad, 3), np.uint8)
            padded[:] = fill
            padded[pad:pad + h, pad:pad + w] = im
            dy, dx = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
            im = padded[dy:dy + h, dx:dx + w]
        out[i] = im
    x = normalise(out)
    for i in range(n):
        if rng.random() >= erase:
            continue
        for _ in range(10):
            area = rng.uniform(0.02, 0.4) * h * w
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                y0, x0 = rng.randint(0, h - eh), rng.randint(0, w - ew)
                x[i, :, y0:y0 + eh, x0:x0 + ew] = torch.randn(3, eh, ew)
                break
    return x


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if ZERO_GAMMA:
            nn.init.zeros_(self.bn2.weight)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Tower(nn.Module):
    def __init__(self, widths, blocks, strides, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for wd, nb, st in zip(widths, blocks, strides):
            for j in range(nb):
                layers.append(Block(cin, wd, st if j == 0 else 1))
                cin = wd
        self.layers = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, embed)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, pooled=False):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x).mean(dim=(2, 3))
        return x if pooled else self.proj(x)


def losses(emb, ids, margin=0.3, tau=0.1, normalise_triplet=True):
    z = F.normalize(emb, dim=1)
    cos = z @ z.t()
    n = len(ids)
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    if normalise_triplet:
        d = (2 - 2 * cos).clamp(1e-12, 4).sqrt()
    else:
        d = torch.cdist(emb, emb).clamp(min=1e-12)
    hp = (d * pos).max(1).values
    hn = (d + 10 * (~neg)).min(1).values
    trip = F.relu(hp - hn + margin).mean()
    logits = cos / tau - 1e4 * eye
    logp = F.log_softmax(logits, 1)
    sup = -((logp * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()
    return trip, sup


def market1501(dist, qp, gp, qc, gc):
    r1, aps = [], []
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i]))
        match = (gp[order] == qp[i])[keep]
        if not match.any():
            continue
        r1.append(float(match[0]))
        hits = np.where(match)[0]
        aps.append(np.mean([(k + 1) / (p + 1) for k, p in enumerate(hits)]))
    return float(np.mean(r1)), float(np.mean(aps))


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--data", required=True)
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--batch", type=int, default=64)
    a.add_argument("--per-id", type=int, default=4)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--warmup", type=int, default=50)
    a.add_argument("--widths", default="32,64,128,256")
    a.add_argument("--blocks", default="2,2,2,2")
    a.add_argument("--strides", default="1,2,2,1")
    a.add_argument("--embed", type=int, default=256)
    a.add_argument("--w-triplet", type=float, default=1.0)
    a.add_argument("--w-supcon", type=float, default=1.0)
    a.add_argument("--eval-every", type=int, default=100)
    a.add_argument("--feature", default="joint", choices=["joint", "pooled"])
    a.add_argument("--w-id", type=float, default=0.0, help="BNNeck identity classifier")
    a.add_argument("--tau", type=float, default=0.1)
    a.add_argument("--raw-triplet", action="store_true", help="Euclidean on the raw feature")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--bench", type=int, default=0, help="only time this many steps")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--zero-gamma", action="store_true")
    args = a.parse_args()
    global ZERO_GAMMA
    ZERO_GAMMA = args.zero_gamma
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    h, w = 128, 64
    ints = lambda s: [int(v) for v in s.split(",")]
    model = Tower(ints(args.widths), ints(args.blocks), ints(args.strides), args.embed)
    pooled = args.feature == "pooled"
    feat_dim = ints(args.widths)[-1] if pooled else args.embed
    neck = nn.BatchNorm1d(feat_dim)
    neck.bias.requires_grad_(False)
    classifier = nn.Linear(feat_dim, 1000, bias=False)
    nn.init.normal_(classifier.weight, std=0.001)
    params = list(model.parameters()) + list(neck.parameters()) + list(classifier.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, eps=1e-8)
    if args.bench:
        x = torch.randn(args.batch, 3, h, w)
        ids = torch.arange(args.batch) // args.per_id
        times = []
        for i in range(args.bench + 2):
            t0 = time.perf_counter()
            trip, sup = losses(model(x, pooled), ids)
            opt.zero_grad()
            (trip + sup).backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        print(json.dumps({"peer": "pytorch", "median_step_ms": 1e3 * float(np.median(times)),
                          "threads": args.threads, "batch": args.batch}))
        return
    tx, tp, _ = load_folder(os.path.join(args.data, "bounding_box_train"), h, w)
    qx, qp, qc = load_folder(os.path.join(args.data, "query"), h, w)
    gx, gp, gc = load_folder(os.path.join(args.data, "bounding_box_test"), h, w)
    groups = {}
    for i, p in enumerate(tp):
        groups.setdefault(p, []).append(i)
    keys = sorted(groups)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            q = F.normalize(torch.cat([model(normalise(qx[i:i + 128]), pooled) for i in range(0, len(qx), 128)]), dim=1)
            g = F.normalize(torch.cat([model(normalise(gx[i:i + 128]), pooled) for i in range(0, len(gx), 128)]), dim=1)
        model.train()
        r1, m = market1501((1 - q @ g.t()).numpy(), qp, gp, qc, gc)
        print(json.dumps({"step": step, "images_seen": step * args.batch, "rank1": r1, "mAP": m}), flush=True)

    t0 = time.time()
    for step in range(args.steps):
        chosen = rng.sample(keys, args.batch // args.per_id)
        idx, ids, labels = [], [], []
        for k, p in enumerate(chosen):
            members = groups[p][:]
            rng.shuffle(members)
            for j in range(args.per_id):
                idx.append(members[j % len(members)])
                ids.append(k)
                labels.append(keys.index(p))
        x = augment(tx[idx], rng)
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step)
        feat = model(x, pooled)
        trip, sup = losses(feat, torch.tensor(ids), tau=args.tau, normalise_triplet=not args.raw_triplet)
        loss = args.w_triplet * trip + args.w_supcon * sup
        if args.w_id > 0:
            logits = classifier(neck(feat))
            loss = loss + args.w_id * F.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 20 == 0:
            print(json.dumps({"step": step + 1, "triplet": trip.item(), "supcon": sup.item(),
                              "elapsed_s": time.time() - t0}), flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evaluate(step + 1)


if __name__ == "__main__":
    main()
