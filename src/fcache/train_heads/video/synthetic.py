"""How ``fcache bench`` measures video heads: the paper's Tables 7/8 columns (frozen 4 global blocks, finetuned linear,
batch 64 (SwinV2-L 32, SwinV2-G 16) of 16-frame clips at 224 px) on clips labelled with Kinetics-400's 400 classes; the
store holds only the levels the heads read."""

from __future__ import annotations

from functools import partial

from fcache.train_heads.classification.synthetic import head_levels, label_specs, random_labels
from fcache.train_heads.task import BenchDef, Synthetic

CLASSES = 400

BENCH = BenchDef(
    "global:blocks=4",
    "linear",
    64,
    224,
    Synthetic(label_specs, driver=partial(random_labels, classes=CLASSES), classes=CLASSES),
    frames=16,
    paper=True,
    batch_of={"swinv2-l": 32, "swinv2-g": 16},
    levels=head_levels,
)
