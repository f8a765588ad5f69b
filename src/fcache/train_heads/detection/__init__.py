"""Detection + instance segmentation heads on cached features: Mask R-CNN and Cascade R-CNN from torchvision parts."""

from __future__ import annotations

from fcache.train_heads.detection.model import Detector, build_detector
from fcache.train_heads.detection.task import HEADS, TASK, DetectionTask, parse_detection_head

__all__ = ["HEADS", "TASK", "DetectionTask", "Detector", "build_detector", "parse_detection_head"]
