"""Segmentation heads: training step time and peak memory on SwinV2-B-shaped features (paper Tables 7-8, ADE20K columns).

Synthetic features shaped like SwinV2-B at SIZE (p2..p5: 128/256/512/1024 channels, strides 4..32), ADE20K's 150
classes, label maps of ~12 classes in blocks with an unlabelled border; one step = forward + loss + backward + AdamW
step. Each head runs in its own process so that its peak memory is its own: peak RSS (getrusage) on CPU, with the
RSS before the head was built alongside; max_memory_allocated on CUDA.
Usage: python benchmarks/seg_heads.py [--size 512] [--batch 2] [--iters 2] [--device cpu|cuda] [--heads SPEC;SPEC]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.spec import Geometry, LevelSpec  # noqa: E402
from fcache.train_heads.config import TrainConfig  # noqa: E402
from fcache.train_heads.defaults import with_defaults  # noqa: E402
from fcache.train_heads.loop import make_optimizer, trainable_parameters  # noqa: E402
from fcache.train_heads.segmentation import SegmentationTask, parse_segmentation_head  # noqa: E402
from fcache.train_heads.task import Batch  # noqa: E402

HEADS = ";".join(
    (
        "upernet:neck=fpn",
        "upernet:neck=bifpn,layers=5",
        "mask2former:pixel_blocks=1,decoder_blocks=3",
        "mask2former:pixel_blocks=6,decoder_blocks=9",
    )
)
SWINV2_B = (LevelSpec("p2", 128, 4), LevelSpec("p3", 256, 8), LevelSpec("p4", 512, 16), LevelSpec("p5", 1024, 32))
CLASSES = 150


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def synthetic_batch(size: int, batch: int, seed: int = 0) -> Batch:
    """Features of SwinV2-B's shape and (B, size, size) labels: blocks of ~12 classes per image, 255 on a border."""
    g = torch.Generator().manual_seed(seed)
    feats = {lv.name: torch.randn(batch, lv.channels, lv.size(size), lv.size(size), generator=g) for lv in SWINV2_B}
    rng = np.random.default_rng(seed)
    labels = []
    for _ in range(batch):
        classes = rng.choice(CLASSES, 12, replace=False)
        grid = classes[rng.integers(0, 12, (8, 8))]
        lab = np.kron(grid, np.ones((size // 8, size // 8), np.int64))
        lab[:, -size // 16 :] = 255
        labels.append(torch.from_numpy(lab))
    geometry = [Geometry(orig_h=size, orig_w=size, scale=1.0, valid_w=size, valid_h=size, canvas=size)] * batch
    return Batch(list(range(batch)), [0] * batch, feats, geometry, labels, [{}] * batch)


def measure(spec: str, size: int, batch: int, steps: int, device: torch.device) -> dict:
    """Seconds per step (mean over ``steps`` after one warm-up step) and peak memory of one head, in this process."""
    task = SegmentationTask(parse_segmentation_head(spec), [f"class{k}" for k in range(CLASSES)])
    data = synthetic_batch(size, batch).to(device)
    base = rss_mb()
    torch.manual_seed(0)
    model = task.build(SWINV2_B).to(device).train()
    opt = make_optimizer(model, with_defaults(TrainConfig(store="", out="", head=spec, iters=1, task="segmentation", weight_decay=0.05)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k in range(steps + 1):
        if k == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(task.loss(model, data).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t) / steps
    row = {"head": spec, "params_M": trainable_parameters(model) / 1e6, "step_s": seconds}
    if device.type == "cuda":
        row["peak_GB"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        row["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["rss_before_MB"] = base
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations, after one warm-up")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--heads", default=HEADS, help="head specs separated by ';'")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one head in this process, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.batch, args.iters, torch.device(args.device))))
        return
    rows = []
    for spec in args.heads.split(";"):
        cmd = [sys.executable, __file__, "--one", spec, "--size", str(args.size), "--batch", str(args.batch), "--iters", str(args.iters)]
        out = subprocess.run([*cmd, "--device", args.device], check=True, capture_output=True, text=True).stdout
        rows.append({"size": args.size, "batch": args.batch, "device": args.device, **json.loads(out.strip().splitlines()[-1])})
        print(f"{spec}: {rows[-1]['step_s']:.2f} s/step", file=sys.stderr)
    print(f"segmentation heads, SwinV2-B-shaped features at {args.size}, batch {args.batch}, {CLASSES} classes, {args.device}:")
    print(table(rows, list(rows[0])))
    print(f"results: {save('seg_heads', {'args': vars(args), 'threads': torch.get_num_threads(), 'rows': rows})}")


if __name__ == "__main__":
    main()
