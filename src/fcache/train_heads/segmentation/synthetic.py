"""How ``fcache bench`` measures segmentation heads: the paper's Tables 7/8 columns (frozen Mask2Former with 6 pixel
decoder blocks, finetuned with 1, batch 16 at 512 px; SwinV2-G batch 8 at 640) on label maps of rectangles of random
classes (ADE20K's 150) with some ignored pixels."""

from __future__ import annotations

from typing import Any

import numpy as np

from fcache.spec import Targets
from fcache.store import TargetSpec
from fcache.train_heads.task import BenchDef, Synthetic

CLASSES = 150


def specs(s: int) -> dict[str, Any]:
    return {"targets": {Targets.SEGMENTATION: TargetSpec("uint8", (s, s), fill=Targets.IGNORE)}}


def label_maps(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(n, s, s) maps: a background class, 4 rectangles of other classes, the last rows ignored (255)."""
    maps = np.empty((n, s, s), np.uint8)
    for i in range(n):
        maps[i] = rng.integers(CLASSES)
        for _ in range(4):
            y, x = rng.integers(0, s // 2, 2)
            h, w = rng.integers(s // 8, s // 2, 2)
            maps[i, y : y + h, x : x + w] = rng.integers(CLASSES)
        maps[i, -s // 16 :] = Targets.IGNORE
    return {Targets.SEGMENTATION: maps}


BENCH = BenchDef(
    "mask2former:pixel_blocks=6",
    "mask2former:pixel_blocks=1",
    16,
    512,
    Synthetic(specs, per_sample=label_maps, classes=CLASSES),
    paper=True,
    batch_of={"swinv2-g": 8},
    input_size_of={"swinv2-g": 640},
)
