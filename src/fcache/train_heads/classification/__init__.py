"""Classification on cached features: a linear probe on a pooled level, and the label-task parts video reuses."""

from __future__ import annotations

from fcache.train_heads.classification.model import Classifier, LinearProbe
from fcache.train_heads.classification.scoring import score_views, topk_hits
from fcache.train_heads.classification.task import HEADS, TASK, ClassificationTask, LabelTask, parse_classification_head

__all__ = [
    "HEADS",
    "TASK",
    "ClassificationTask",
    "Classifier",
    "LabelTask",
    "LinearProbe",
    "parse_classification_head",
    "score_views",
    "topk_hits",
]
