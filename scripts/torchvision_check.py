#!/usr/bin/env python3
"""Checks that torchvision's ResNet, loaded from a `plipd export` file, embeds images exactly as
plipd does (README "Weights in PyTorch"). Run by scripts/torchvision-check.sh, which installs
torch and torchvision into a git-ignored venv; never a runtime dependency.

  torchvision_check.py pngs SRC OUT H W
      copies a Market-1501 folder's query/ and bounding_box_test/ images to OUT as H×W PNGs
      (lossless, at the model's input size, so both sides see the same pixels)
  torchvision_check.py compare EXPORT DATA POOLED.jsonl NECK.jsonl
      loads EXPORT into torchvision's resnet18/resnet50 and compares its pooled feature and
      BNNeck embedding of DATA's images with plipd's (`plipd eval --embeddings`, joint feature
      pooled and neck); prints one JSON line, exits 1 beyond 1e-4
"""
import glob, json, os, sys

import numpy as np

MEAN = np.array([0.357, 0.323, 0.328], np.float32)
STD = np.array([0.252, 0.242, 0.239], np.float32)
SPLITS = ["query", "bounding_box_test"]
# The split names `plipd eval --embeddings` gives the folders' images.
PLIPD_SPLIT = {"query": "query", "bounding_box_test": "gallery"}


def pngs(src, out, h, w):
    from PIL import Image
    n = 0
    for split in SPLITS:
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for f in sorted(glob.glob(os.path.join(src, split, "*.jpg"))):
            name = os.path.splitext(os.path.basename(f))[0] + ".png"
            img = Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR)
            img.save(os.path.join(out, split, name))
            n += 1
    print(json.dumps({"pngs": n, "size": f"{h}x{w}"}))


def load_resnet(export):
    """torchvision's ResNet holding the file's image tower, in eval mode, and the file's facts."""
    import torch, torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(export, "pt") as f:
        meta = f.metadata()
    dims = json.loads(meta["dims"])
    blocks, widths, strides = dims["conv_blocks"], dims["conv_widths"], dims["conv_strides"]
    kind = dims.get("conv_block", "basic")
    if widths != [64, 128, 256, 512]:
        sys.exit(f"stage widths {widths} are not torchvision's 64-128-256-512")
    builders = {("basic", (2, 2, 2, 2)): torchvision.models.resnet18,
                ("basic", (3, 4, 6, 3)): torchvision.models.resnet34,
                ("bottleneck", (3, 4, 6, 3)): torchvision.models.resnet50}
    build = builders.get((kind, tuple(blocks)))
    if build is None:
        sys.exit(f"no torchvision model with {kind} blocks {blocks}")
    net = build(weights=None)
    net.fc = torch.nn.Identity()
    # torchvision strides stages 2-4 by 2; plipd's presets keep the last at 1 (the ReID
    # practice): set each stage's first block as the file says.
    for layer, s in zip([net.layer1, net.layer2, net.layer3, net.layer4], strides):
        first = layer[0]
        (first.conv2 if kind == "bottleneck" else first.conv1).stride = (s, s)
        if first.downsample is not None:
            first.downsample[0].stride = (s, s)
    state = load_file(export)
    image = {k[len("image."):]: v for k, v in state.items() if k.startswith("image.")}
    missing, unexpected = net.load_state_dict(image, strict=False)
    # torchvision counts BatchNorm updates; plipd does not keep the count.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        sys.exit(f"tensors missing from the file: {missing[:5]}")
    net.eval()
    neck = {k.rsplit(".", 1)[1]: v for k, v in state.items() if ".neck." in k}
    return net, neck, dims


def embeddings(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") == "image":
            out[(r["split"], r["row"])] = (r["person"], np.array(r["embedding"], np.float32))
    return out


def compare(export, data, pooled_path, neck_path):
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    net, neck, dims = load_resnet(export)
    h, w = dims["image_height"], dims["image_width"]
    from PIL import Image
    pooled, necked = embeddings(pooled_path), embeddings(neck_path)
    worst_p = worst_n = 0.0
    n = 0
    for split in SPLITS:
        files = sorted(glob.glob(os.path.join(data, split, "*.png")))
        for row, f in enumerate(files):
            key = (PLIPD_SPLIT[split], row)
            if key not in pooled:
                sys.exit(f"{f}: plipd embedded no {key}")
            person, want_p = pooled[key]
            if not os.path.basename(f).startswith(f"{person}_"):
                sys.exit(f"{f}: plipd's row {row} of {split} is person {person}")
            px = np.asarray(Image.open(f).convert("RGB"), np.float32)
            if px.shape != (h, w, 3):
                sys.exit(f"{f}: {px.shape[:2]}, the model takes {h}x{w}")
            x = torch.from_numpy(((px / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())[None]
            with torch.no_grad():
                feat = net(x)[0]
            p = torch.nn.functional.normalize(feat, dim=0).numpy()
            worst_p = max(worst_p, float(np.abs(p - want_p).max()))
            if neck:
                z = (feat - neck["running_mean"]) / torch.sqrt(neck["running_var"] + 1e-5)
                z = z * neck["weight"] + neck["bias"]
                z = torch.nn.functional.normalize(z, dim=0).numpy()
                worst_n = max(worst_n, float(np.abs(z - necked[key][1]).max()))
            n += 1
    if n != len(pooled):
        sys.exit(f"{n} PNGs, plipd embedded {len(pooled)} images")
    ok = n > 0 and worst_p <= 1e-4 and worst_n <= 1e-4
    print(json.dumps({"images": n, "preset": dims["name"], "max_abs_diff_pooled": worst_p,
                      "max_abs_diff_neck": worst_n if neck else None, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "pngs" and len(sys.argv) == 6:
        pngs(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "compare" and len(sys.argv) == 6:
        compare(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
