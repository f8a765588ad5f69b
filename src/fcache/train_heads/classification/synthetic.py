"""How ``fcache bench`` measures a linear probe (not in the paper's Tables 7/8): frozen and finetuned linear heads on
p5, batch 64 at 224 px, images labelled with ImageNet-1K's 1000 classes. The label targets and the store's levels (only
those the heads read) serve video too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fcache.spec import Targets
from fcache.store import TargetSpec
from fcache.train_heads.headspec import HeadSpec
from fcache.train_heads.task import BenchDef, Synthetic

CLASSES = 1000


def label_specs(s: int) -> dict[str, Any]:
    return {"targets": {Targets.LABEL: TargetSpec("int64", (), fill=-1)}}


def random_labels(n: int, s: int, rng: np.random.Generator, classes: int = CLASSES) -> dict[str, np.ndarray]:
    return {Targets.LABEL: rng.integers(classes, size=n).astype(np.int64)}


def head_levels(heads: Sequence[HeadSpec]) -> tuple[str, ...]:
    """The levels the heads read (each head spec's ``level``): the store holds only those."""
    return tuple(sorted({str(h["level"]) for h in heads}))


BENCH = BenchDef("linear", "linear", 64, 224, Synthetic(label_specs, driver=random_labels, classes=CLASSES), levels=head_levels)
