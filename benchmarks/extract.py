"""Extraction overhead: pipeline images/s over bare backbone forward images/s (same model, batch, device).

The pipeline is the whole `fcache extract` run after start-up (decoding in DataLoader workers,
views, backbone, encoding + compression + commit on the writer thread); the bare forward runs
the same backbone on batches already in memory. Goal >= 0.90.
Usage: python benchmarks/extract.py [--sizes 256:0,512:1] [--images 48] [--batch-size 4] [--num-workers 1]
(SIZE:WORKERS sets the DataLoader workers of one size; on 2 cores decoding in the main thread wins at small sizes)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photo_folder, save, table  # noqa: E402
from fcache.extract.backbones import build_backbone  # noqa: E402
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract  # noqa: E402


def bare_images_per_s(model: str, size: int, batch: int, device: str, seconds: float = 8.0) -> float:
    bb = build_backbone(model, input_size=size, random_init=True, device=device)
    x = torch.randn(batch, 3, size, size)
    bb.forward(x)  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        feats = bb.forward(x)
        {k: v.cpu() for k, v in feats.items()}
        n += batch
    return n / (time.perf_counter() - t)


def pipeline(model: str, size: int, batch: int, workers: int, device: str, root: Path, out: Path) -> dict:
    cfg = ExtractConfig.from_flags(
        dataset="folder",
        root=str(root),
        out=str(out),
        model=model,
        random_init=True,
        input_size=size,
        batch_size=batch,
        num_workers=workers,
        device=device,
        shard_size=8,
        overwrite=True,
    )
    s = run_extract(cfg)
    return {"images_per_s": s.images_per_s, **{f"{k}_s": v for k, v in s.timing.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinv2-t")
    ap.add_argument("--sizes", default="256:0,512:1", help="SIZE[:WORKERS],...")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fcache-bench-"))
    photo_folder(tmp / "images", args.images)
    rows = []
    try:
        for spec in args.sizes.split(","):
            size_text, _, workers_text = spec.partition(":")
            size, workers = int(size_text), int(workers_text or args.num_workers)
            bare1 = bare_images_per_s(args.model, size, args.batch_size, args.device)
            pipe = pipeline(args.model, size, args.batch_size, workers, args.device, tmp / "images", tmp / "s.zarr")
            bare2 = bare_images_per_s(args.model, size, args.batch_size, args.device)
            bare = (bare1 + bare2) / 2
            rows.append(
                {
                    "model": args.model,
                    "size": size,
                    "batch": args.batch_size,
                    "workers": workers,
                    "device": args.device,
                    "bare_img_s": bare,
                    "pipeline_img_s": pipe["images_per_s"],
                    "ratio": pipe["images_per_s"] / bare,
                    "loader_wait_s": pipe["loader_wait_s"],
                    "forward_s": pipe["forward_s"],
                    "writer_wait_s": pipe["writer_wait_s"],
                    "busy_s": pipe["busy_s"],
                }
            )
            print(f"size {size}: ratio {rows[-1]['ratio']:.3f}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"extraction overhead ({args.images} real photos; goal ratio >= 0.90)")
    print(table(rows, list(rows[0])))
    print(f"results: {save('extract', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
