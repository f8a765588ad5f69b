"""Semantic segmentation heads on cached features: UPerNet (FPN or BiFPN) and Mask2Former, scored by mIoU."""

from __future__ import annotations

from fcache.train_heads.segmentation.mask2former import Mask2Former, build_mask2former
from fcache.train_heads.segmentation.task import (
    HEADS,
    TASK,
    SegmentationTask,
    check_eval_store,
    check_store,
    parse_segmentation_head,
)
from fcache.train_heads.segmentation.upernet import UPerNet, build_upernet

__all__ = [
    "HEADS",
    "Mask2Former",
    "SegmentationTask",
    "UPerNet",
    "build_mask2former",
    "build_upernet",
    "check_eval_store",
    "check_store",
    "parse_segmentation_head",
    "TASK",
]
