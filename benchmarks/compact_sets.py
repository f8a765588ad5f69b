"""The three small sets benchmarks/compact.py measures stored forms on, each extracted once, losslessly (fp32).

- detection: the demo's set (``fcache.apps.demo``: photos with pasted squares, discs and triangles, COCO boxes and
  masks), its extraction flags (random-init SwinV2-T at 256, p3..p5) and its head (BiFPN Mask R-CNN); box AP50.
- segmentation: an ADE20K-layout set (photos with a pasted disc and rectangle, label PNGs, an unlabelled band) at 128,
  p2..p5, UPerNet; single-scale mIoU.
- video: clips of a white square moving left to right and their time reversals (FFV1, lossless, 64 px), 8 frames
  at 128, p5, one temporal block (a time-order-blind head cannot tell the two classes apart); top-1.
Each set's train and val samples differ (other seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fcache.apps.config import DemoConfig
from fcache.apps.demo import build_dataset, extract_settings, train_settings
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract

DEMO = DemoConfig()
LOSSLESS = "fp32"
RANDOM_SWIN_T = {"model": "swinv2-t", "random_init": True, "seed": DEMO.seed, "device": "cpu", "num_workers": 0}


@dataclass(frozen=True)
class SetDef:
    """One set: how its lossless stores are made, the head trained on them and the metric it is judged by."""

    name: str
    task: str
    metric: str  # key of the evaluation's metrics
    goal: float  # the loss of (a) allowed, in the metric's units (AP50 0.02; mIoU and top-1 one point: 0.01)
    head: str
    train: dict[str, Any]  # TrainConfig fields besides store, out, head, task, seed and val_store
    sizes: tuple[int, int]  # train and val samples (video: clip pairs)
    build: Callable[[Path, str, int, int], dict[str, Any]]  # (root, split, n, seed) -> extract flags of the split's source
    extract: dict[str, Any] = field(default_factory=dict)  # ExtractConfig fields besides the source's


def lossless_stores(s: SetDef, root: Path, scale: float = 1.0) -> tuple[Path, Path]:
    """The set's train and val samples (``scale`` x its sizes) extracted once in fp32: (train store, val store)."""
    out = []
    for split, n, seed in (("train", s.sizes[0], 0), ("val", s.sizes[1], 1000)):
        source = s.build(root / "data" / split, split, max(4, round(n * scale)), seed)
        store = root / f"{split}-lossless.zarr"
        run_extract(ExtractConfig.from_flags(**source, **{**RANDOM_SWIN_T, **s.extract}, dtype=LOSSLESS, out=str(store)))
        out.append(store)
    return out[0], out[1]


def coco_split(root: Path, split: str, n: int, seed: int) -> dict[str, Any]:
    images, annotations = build_dataset(root, n, seed)
    return {"dataset": "coco", "root": str(images), "annotations": str(annotations)}


SEG_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png", "retina.jpg")
ADE_SPLITS = {"train": "training", "val": "validation"}


def seg_sample(k: int, rng: np.random.Generator, long_side: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A photo with a green disc (label value 2) and a magenta rectangle (3) over it (1), an unlabelled top band (0)."""
    import skimage.data

    im = Image.open(Path(skimage.data.__file__).parent / SEG_PHOTOS[k % len(SEG_PHOTOS)]).convert("RGB")
    scale = long_side / max(im.size)
    a = np.array(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR))
    h, w = a.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    r = rng.uniform(0.2, 0.35) * min(h, w)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    rect = (xx >= x0) & (xx < x0 + w // 2) & (yy >= y0) & (yy < y0 + h // 2) & ~disc
    label = np.ones((h, w), np.uint8)
    a[disc], label[disc] = (40, 230, 60), 2
    a[rect], label[rect] = (230, 40, 220), 3
    label[:3] = 0
    return a, label


def ade_split(root: Path, split: str, n: int, seed: int) -> dict[str, Any]:
    """root/images/<split>/*.jpg + root/annotations/<split>/*.png (the ADEChallengeData2016 layout)."""
    name = ADE_SPLITS[split]
    (root / "images" / name).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        im, label = seg_sample(k, rng)
        Image.fromarray(im).save(root / "images" / name / f"ADE_{k:04d}.jpg", quality=95)
        Image.fromarray(label).save(root / "annotations" / name / f"ADE_{k:04d}.png")
    return {"dataset": "ade20k", "root": str(root), "split": name}


CLIP_FRAMES, CLIP_SIZE = 8, 64
CLIP_INPUT = 128  # p5 maps of 4 x 4: at 64 px (2 x 2) each channel's scale weighs as much as 4 values, at 128 as 16
DIRECTIONS = ("left-to-right", "right-to-left")


def write_clip(path: Path, frames: np.ndarray) -> None:
    """(n, H, W, 3) uint8 frames, losslessly (FFV1 in Matroska)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for i, a in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def clip_split(root: Path, split: str, n: int, seed: int) -> dict[str, Any]:
    """root/<direction>/vNNN.mkv: n clips of a square moving right by 8 px a frame, and their n time reversals."""
    rng = np.random.default_rng(seed)
    for name in DIRECTIONS:
        (root / name).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        side = int(rng.integers(14, 19))
        y, x0 = int(rng.integers(0, CLIP_SIZE - side)), int(rng.integers(-10, -2))
        frames = np.zeros((CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE, 3), np.uint8)
        for t in range(CLIP_FRAMES):
            x = x0 + 8 * t
            frames[t, y : y + side, max(x, 0) : max(x + side, 0)] = 255
        write_clip(root / DIRECTIONS[0] / f"v{k:03d}.mkv", frames)
        write_clip(root / DIRECTIONS[1] / f"v{k:03d}.mkv", frames[::-1])
    return {"dataset": "video", "root": str(root), "frames": CLIP_FRAMES}


SETS = {
    "detection": SetDef(
        "detection", "detection", "box/AP50", 0.02, DEMO.head,
        {k: v for k, v in train_settings(DEMO).items() if k not in ("head", "seed")},
        (DEMO.train_images, DEMO.val_images), coco_split, extract_settings(DEMO),
    ),
    "segmentation": SetDef(
        "segmentation", "segmentation", "ss/mIoU", 0.01, "upernet:channels=64",
        {"iters": 100, "batch_size": 4, "lr": 1e-2, "warmup": 0},
        (24, 12), ade_split, {"input_size": 128, "batch_size": 4, "shard_size": 4},
    ),
    "video": SetDef(
        "video", "video", "avg/top1", 0.01, "temporal:blocks=1,dim=64,dropout=0",
        {"iters": 200, "batch_size": 16, "lr": 1e-3},
        (16, 8), clip_split, {"input_size": CLIP_INPUT, "levels": ("p5",), "batch_size": 32, "shard_size": 8},
    ),
}  # fmt: skip
