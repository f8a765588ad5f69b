"""Synthetic feature stores for ``fcache bench``: random features of a backbone's exact level shapes, per task.

Detection: a few boxes (with polygon masks) per image and two categories; segmentation: label maps of rectangles of
random classes (ADE20K's 150) with some ignored pixels; video: clips of ``frames`` per-frame maps and a class each
(Kinetics-400's 400). Shapes come from the backbone built on the meta device, so no weights are needed (SwinV2-G).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcache import store as fstore
from fcache.spec import (
    GEOMETRY_FIELDS,
    BackboneInfo,
    DatasetInfo,
    Geometry,
    Manifest,
    Preprocessing,
    SourceConfig,
    StorageSpec,
    Targets,
    keys_digest,
)
from fcache.store import StoreWriter, TargetSpec

SEGMENTATION_CLASSES = 150
VIDEO_CLASSES = 400


def synthetic_store(
    path: Path, task: str, backbone: BackboneInfo, *, samples: int, shard_size: int, dtype: str, frames: int, seed: int
) -> Path:
    """A committed store at ``path`` of ``samples`` random samples for ``task`` (``frames`` per clip for video)."""
    keys = [f"bench{i}" for i in range(samples)]
    labels = {"segmentation": SEGMENTATION_CLASSES, "video": VIDEO_CLASSES}.get(task, 0)
    dataset = DatasetInfo(
        SourceConfig("synthetic", ""), samples, keys_digest(keys), task=task, label_names=tuple(f"class{k}" for k in range(labels))
    )
    pre = Preprocessing(seed=seed, frames=frames if task == "video" else None)
    m = Manifest(backbone, pre, StorageSpec(dtype=dtype, shard_size=shard_size), dataset)
    rng = np.random.default_rng(seed)
    s = backbone.input_size
    writer = fstore.create(path, m, keys, **TARGETS[task].specs(s))
    for name, values in TARGETS[task].driver(samples, s, rng).items():
        writer.write_targets(name, values)
    _write_units(writer, m, rng, TARGETS[task].per_sample)
    writer.finalize()
    return path


def _write_units(writer: StoreWriter, m: Manifest, rng: np.random.Generator, per_sample: Callable[..., Any] | None) -> None:
    """Every unit: standard-normal features, status ok, the plain view's geometry, the per-sample targets."""
    s = m.backbone.input_size
    geometry = Geometry(orig_h=s, orig_w=s, scale=1.0, valid_w=s, valid_h=s, canvas=s).to_array()
    for unit in writer.pending():
        n = len(unit)
        feats = {lv.name: rng.standard_normal((n, 1, *m.level_shape(lv.name)), dtype=np.float32) for lv in m.levels}
        geo = np.broadcast_to(geometry, (n, 1, len(GEOMETRY_FIELDS))).copy()
        targets = per_sample(n, s, rng) if per_sample else None
        writer.write_unit(unit, feats, np.ones(n, np.uint8), geo, targets=targets)


def _detection_specs(s: int) -> dict[str, Any]:
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]
    return {"targets": {"image": TargetSpec("str"), "annotations": TargetSpec("str")}, "target_attrs": {"categories": categories}}


def _detection_driver(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    images = [json.dumps({"id": i + 1, "width": s, "height": s}) for i in range(n)]
    return {
        "image": np.array(images, dtype=object),
        "annotations": np.array([json.dumps(_boxes(i + 1, s, rng)) for i in range(n)], dtype=object),
    }


def _boxes(image_id: int, s: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for k in range(3):
        bw, bh = (float(v) for v in rng.uniform(0.1, 0.4, 2) * s)
        x, y = float(rng.uniform(0, s - bw)), float(rng.uniform(0, s - bh))
        poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
        out.append({"id": image_id * 10 + k, "image_id": image_id, "category_id": 1 + k % 2, "bbox": [x, y, bw, bh],
                    "area": bw * bh, "iscrowd": 0, "segmentation": [poly]})  # fmt: skip
    return out


def _segmentation_specs(s: int) -> dict[str, Any]:
    return {"targets": {Targets.SEGMENTATION: TargetSpec("uint8", (s, s), fill=Targets.IGNORE)}}


def _label_maps(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(n, s, s) maps: a background class, 4 rectangles of other classes, the last rows ignored (255)."""
    maps = np.empty((n, s, s), np.uint8)
    for i in range(n):
        maps[i] = rng.integers(SEGMENTATION_CLASSES)
        for _ in range(4):
            y, x = rng.integers(0, s // 2, 2)
            h, w = rng.integers(s // 8, s // 2, 2)
            maps[i, y : y + h, x : x + w] = rng.integers(SEGMENTATION_CLASSES)
        maps[i, -s // 16 :] = Targets.IGNORE
    return {Targets.SEGMENTATION: maps}


def _video_specs(s: int) -> dict[str, Any]:
    return {"targets": {Targets.LABEL: TargetSpec("int64", (), fill=-1)}}


def _video_driver(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {Targets.LABEL: rng.integers(VIDEO_CLASSES, size=n).astype(np.int64)}


def _none(n: int, s: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {}


@dataclass(frozen=True)
class TaskTargets:
    """How one task's synthetic targets are declared (``specs``: ``fstore.create`` arguments) and made: at store
    creation for all samples (``driver``), or with each unit's features (``per_sample``)."""

    specs: Callable[[int], dict[str, Any]]
    driver: Callable[[int, int, np.random.Generator], dict[str, np.ndarray]] = _none
    per_sample: Callable[[int, int, np.random.Generator], dict[str, np.ndarray]] | None = None


TARGETS: dict[str, TaskTargets] = {
    "detection": TaskTargets(_detection_specs, driver=_detection_driver),
    "segmentation": TaskTargets(_segmentation_specs, per_sample=_label_maps),
    "video": TaskTargets(_video_specs, driver=_video_driver),
}


def video_levels(heads: Sequence[Any]) -> tuple[str, ...]:
    """The levels video heads read (each head spec's ``level``): a video store holds only those."""
    return tuple(sorted({str(h["level"]) for h in heads}))
