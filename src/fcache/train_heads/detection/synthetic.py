"""How ``fcache bench`` measures detection heads: the paper's Tables 7/8 columns (frozen BiFPN x5, finetuned FPN, batch
16 (SwinV2-G 8) at 1024 px) on a synthetic store of a few boxes with polygon masks per image, two categories."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fcache.spec import Targets
from fcache.store import TargetSpec
from fcache.train_heads.task import BenchDef, Synthetic

CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]


def specs(s: int) -> dict[str, Any]:
    return {
        "targets": {Targets.IMAGE: TargetSpec("str"), Targets.ANNOTATIONS: TargetSpec("str")},
        "target_attrs": {"categories": CATEGORIES},
    }


def coco_targets(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    images = [json.dumps({"id": i + 1, "width": s, "height": s}) for i in range(n)]
    return {
        Targets.IMAGE: np.array(images, dtype=object),
        Targets.ANNOTATIONS: np.array([json.dumps(boxes(i + 1, s, rng)) for i in range(n)], dtype=object),
    }


def boxes(image_id: int, s: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Three random boxes of 10-40% of the canvas with their rectangles as polygon masks."""
    out = []
    for k in range(3):
        bw, bh = (float(v) for v in rng.uniform(0.1, 0.4, 2) * s)
        x, y = float(rng.uniform(0, s - bw)), float(rng.uniform(0, s - bh))
        poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
        out.append({"id": image_id * 10 + k, "image_id": image_id, "category_id": 1 + k % 2, "bbox": [x, y, bw, bh],
                    "area": bw * bh, "iscrowd": 0, "segmentation": [poly]})  # fmt: skip
    return out


BENCH = BenchDef("bifpn:layers=5", "fpn", 16, 1024, Synthetic(specs, driver=coco_targets), paper=True, batch_of={"swinv2-g": 8})
