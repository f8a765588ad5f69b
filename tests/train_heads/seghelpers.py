"""A tiny ADE20K-style segmentation set made on the fly: real photos with pasted shapes, extracted by `fcache extract`.

Each photo (shipped with scikit-image, long side 96 px) gets a green disc (label value 2 -> class 1) and a magenta
rectangle (value 3 -> class 2) over the photo (value 1 -> class 0), and an unlabelled band (value 0 -> ignore).
A random-init SwinV2-T keeps the colours in its stride-4 features, so a head can learn the classes; the labels
reach the head only through the store's targets and geometry, never through the features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
import torch
from click.testing import CliRunner
from PIL import Image

from fcache.cli import main

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png")
LONG_SIDE = 96
CANVAS = 128
DISC, RECT = (40, 230, 60), (230, 40, 220)


def photo(k: int) -> np.ndarray:
    im = Image.open(Path(skimage.data.__file__).parent / PHOTOS[k % len(PHOTOS)]).convert("RGB")
    scale = LONG_SIDE / max(im.size)
    return np.array(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR))


def sample(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo k with its shapes, and its ADE20K label PNG values (0 ignore, 1 photo, 2 disc, 3 rectangle)."""
    rng = np.random.default_rng(k)
    im = photo(k)
    h, w = im.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    r = rng.uniform(0.25, 0.35) * min(h, w)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    rect = (xx >= x0) & (xx < x0 + w // 2) & (yy >= y0) & (yy < y0 + h // 2) & ~disc
    label = np.ones((h, w), np.uint8)
    im[disc], label[disc] = DISC, 2
    im[rect], label[rect] = RECT, 3
    label[:3] = 0
    return im, label


def make_ade(root: Path, split: str, n: int = 6) -> Path:
    """root/images/<split>/*.jpg + root/annotations/<split>/*.png (ADEChallengeData2016 layout)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        im, label = sample(k)
        Image.fromarray(im).save(root / "images" / split / f"ADE_{k:04d}.jpg", quality=95)
        Image.fromarray(label).save(root / "annotations" / split / f"ADE_{k:04d}.png")
    return root


def extract(root: Path, split: str, out: Path, *flags: str) -> Path:
    """`fcache extract --dataset ade20k` with a random-init SwinV2-T at 128 px, fp32 (exact features), p2..p5.

    One image per forward and one torch thread, as the fidelity test computes them online (the segmentation tests run
    on one thread): the same kernels give the same bits, so the store is compared with online features exactly
    (another batch size or thread count may differ by 1e-7, which a step of AdamW can turn into 1e-6).
    """
    args = ["extract", "--dataset", "ade20k", "--root", str(root), "--split", split, "--random-init", "--model", "swinv2-t"]
    args += ["--input-size", str(CANVAS), "--dtype", "fp32", "--num-workers", "0", "--device", "cpu", "--out", str(out), "--json"]
    args += ["--batch-size", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, [*args, *flags])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    return out


def build_seg_stores(d: Path) -> tuple[Path, Path]:
    """The same 6 images extracted twice: training (2 jittered views each: scale 0.75-1.25, crop, flip) and
    validation (the plain view + test views flip, s0.5, s0.75 and their flips)."""
    root = make_ade(make_ade(d / "ADE", "training"), "validation")
    train = extract(root, "training", d / "train.zarr", "--views", "2", "--view-scale", "0.75,1.25")
    val = extract(root, "validation", d / "val.zarr", "--test-views", "flip,ms")
    return train, val
