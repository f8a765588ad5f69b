"""A tiny classification store whose p5 features carry the class (2 classes) under noise: the linear probe learns it in
a few steps, on one process or several (test_ddp), with any training option (test_loop_options)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from dethelpers import manifest, plain

from fcache import store as fstore
from fcache.spec import GEOMETRY_FIELDS, LevelSpec, Status
from fcache.store import TargetSpec

LEVELS = (LevelSpec("p4", 16, 16), LevelSpec("p5", 8, 32))


def build_label_store(path: Path, n: int = 12, seed: int = 0) -> Path:
    """n images whose p5 features carry their class (2 classes, even and odd) under noise; one plain view each."""
    m, keys = manifest(n, LEVELS, views=1, kind="folder", task="classification")
    m = dataclasses.replace(m, dataset=dataclasses.replace(m.dataset, label_names=("even", "odd")))
    writer = fstore.create(path, m, keys, targets={"label": TargetSpec("int64", fill=-1)})
    labels = np.arange(n) % 2
    writer.write_targets("label", labels)
    rng = np.random.default_rng(seed)
    for unit in writer.pending():
        k = len(unit)
        feats = {lv.name: rng.normal(0, 1, (k, 1, *m.level_shape(lv.name))).astype(np.float32) for lv in LEVELS}
        feats["p5"][:, 0, 0] += 2 * labels[unit.start : unit.stop, None, None] - 1
        geometry = np.tile(plain().to_array(), (k, 1, 1)).reshape(k, 1, len(GEOMETRY_FIELDS))
        writer.write_unit(unit, feats, np.full(k, int(Status.OK), np.uint8), geometry)
    writer.finalize()
    return path
