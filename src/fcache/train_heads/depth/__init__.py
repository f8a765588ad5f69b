"""Monocular depth estimation heads on cached features: DINOv2's linear probe (256 bins) and a DPT decoder, scored by
the NYU-Depth v2 protocol (RMSE, AbsRel, log10, d1..d3)."""

from __future__ import annotations

from fcache.train_heads.depth.dpt import DPTDepth
from fcache.train_heads.depth.linear import LinearDepth, sigloss
from fcache.train_heads.depth.task import HEADS, TASK, DepthTask, parse_depth_head

__all__ = ["HEADS", "TASK", "DPTDepth", "DepthTask", "LinearDepth", "parse_depth_head", "sigloss"]
