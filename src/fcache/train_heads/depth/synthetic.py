"""How ``fcache bench`` measures depth heads (not in the paper's Tables 7/8): a frozen DPT and a finetuned linear probe,
batch 16 at 512 px, on depth maps of a far background (3-8 m) with three nearer rectangles (0.5-3 m) and a band without
measurements."""

from __future__ import annotations

from typing import Any

import numpy as np

from fcache.spec import Targets
from fcache.store import TargetSpec
from fcache.train_heads.task import BenchDef, Synthetic


def specs(s: int) -> dict[str, Any]:
    return {"targets": {Targets.DEPTH: TargetSpec("float32", (s, s), fill=0.0)}}


def depth_maps(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(n, s, s) metres: the background, three rectangles, the last rows 0 (no measurement)."""
    maps = np.empty((n, s, s), np.float32)
    for i in range(n):
        maps[i] = rng.uniform(3.0, 8.0)
        for _ in range(3):
            y, x = rng.integers(0, s // 2, 2)
            h, w = rng.integers(s // 8, s // 2, 2)
            maps[i, y : y + h, x : x + w] = rng.uniform(0.5, 3.0)
        maps[i, -s // 16 :] = 0.0
    return {Targets.DEPTH: maps}


BENCH = BenchDef("dpt", "linear", 16, 512, Synthetic(specs, per_sample=depth_maps))
