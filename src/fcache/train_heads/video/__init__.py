"""Video action recognition heads on cached per-frame features (paper Table 4): linear, temporal and global blocks."""

from __future__ import annotations

from fcache.train_heads.video.model import GlobalHead, TemporalHead, VideoLinear
from fcache.train_heads.video.task import HEADS, TASK, VideoTask, parse_video_head

__all__ = ["HEADS", "TASK", "GlobalHead", "TemporalHead", "VideoLinear", "VideoTask", "parse_video_head"]
