"""A tiny depth set made on the fly: real photos with pasted shapes at known depths, laid out for `--dataset depth-folder`.

Each photo (shipped with scikit-image, long side 96 px) stands at BACKGROUND metres; a green disc is pasted at DISC_M and
a magenta rectangle at RECT_M, and the top rows have no measurement (0). Even samples store their depth as 16-bit PNGs
in millimetres, odd ones as float32 .npy in metres. A random-init SwinV2-T keeps the colours in its stride-4 features, so
a head can learn the depths; they reach it only through the store's targets and geometry, never through the features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image
from seghelpers import DISC, RECT, photo

from fcache.cli import main

BACKGROUND, DISC_M, RECT_M = 4.0, 1.0, 2.5
CANVAS = 128


def sample(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo k with its shapes, and its depth in metres (0 where nothing was measured)."""
    rng = np.random.default_rng(100 + k)
    im = photo(k)
    h, w = im.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    r = rng.uniform(0.2, 0.3) * min(h, w)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    rect = (xx >= x0) & (xx < x0 + w // 2) & (yy >= y0) & (yy < y0 + h // 2) & ~disc
    depth = np.full((h, w), BACKGROUND, np.float32)
    im[disc], depth[disc] = DISC, DISC_M
    im[rect], depth[rect] = RECT, RECT_M
    depth[:3] = 0.0
    return im, depth


def make_depth_folder(root: Path, split: str, n: int = 6, first: int = 0) -> Path:
    """root/images/<split>/img<k>.jpg + root/depth/<split>/img<k>.png (mm) or .npy (m)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "depth" / split).mkdir(parents=True, exist_ok=True)
    for k in range(first, first + n):
        im, depth = sample(k)
        Image.fromarray(im).save(root / "images" / split / f"img{k}.jpg", quality=95)
        if k % 2:
            np.save(root / "depth" / split / f"img{k}.npy", depth)
        else:
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(root / "depth" / split / f"img{k}.png")
    return root


def extract(root: Path, split: str, out: Path, *flags: str) -> Path:
    """`fcache extract --dataset depth-folder` with a random-init SwinV2-T at 128 px, fp32, p2..p5, on one thread."""
    args = ["extract", "--dataset", "depth-folder", "--root", str(root), "--split", split, "--random-init", "--model", "swinv2-t"]
    args += ["--input-size", str(CANVAS), "--dtype", "fp32", "--num-workers", "0", "--device", "cpu", "--out", str(out), "--json"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, [*args, "--batch-size", "1", *flags])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    return out


def build_depth_stores(d: Path) -> tuple[Path, Path]:
    """Training (6 photos, 2 jittered views each) and validation (4 other photos, the plain view + flip) stores."""
    root = make_depth_folder(make_depth_folder(d / "DEPTH", "train"), "val", n=4, first=6)
    train = extract(root, "train", d / "train.zarr", "--views", "2", "--view-scale", "0.75,1.25")
    val = extract(root, "val", d / "val.zarr", "--test-views", "flip")
    return train, val
