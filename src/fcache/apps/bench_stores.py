"""Synthetic feature stores for ``fcache bench``: random features of a backbone's exact level shapes, with the task's
synthetic targets (``TaskDef.bench.targets``: e.g. boxes and masks, label maps, depth maps, class labels). Shapes come
from the backbone built on the meta device, so no weights are needed (SwinV2-G).
"""

from __future__ import annotations

from collections.abc import Callable
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
    keys_digest,
)
from fcache.store import StoreWriter


def synthetic_store(
    path: Path, task: str, backbone: BackboneInfo, *, samples: int, shard_size: int, dtype: str, frames: int, seed: int
) -> Path:
    """A committed store at ``path`` of ``samples`` random samples for ``task`` (clips of ``frames``; 0: images)."""
    from fcache.train_heads.tasks import task_def

    targets = task_def(task).bench.targets
    keys = [f"bench{i}" for i in range(samples)]
    label_names = tuple(f"class{k}" for k in range(targets.classes))
    dataset = DatasetInfo(SourceConfig("synthetic", ""), samples, keys_digest(keys), task=task, label_names=label_names)
    pre = Preprocessing(seed=seed, frames=frames or None)
    m = Manifest(backbone, pre, StorageSpec(dtype=dtype, shard_size=shard_size), dataset)
    rng = np.random.default_rng(seed)
    s = backbone.input_size
    writer = fstore.create(path, m, keys, **targets.specs(s))
    for name, values in targets.driver(samples, s, rng).items():
        writer.write_targets(name, values)
    _write_units(writer, m, rng, targets.per_sample)
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
