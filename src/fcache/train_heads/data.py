"""Evaluation items with every view of a sample at once, so a task can average its views (segmentation's ms+flip,
video's clip x crop protocol, classification's test views).

An item is shaped like a ``FeatureDataset`` item (the loop's Collate takes it unchanged) except that each level holds
all V views, (V, C, H, W) or for video (V, T, C, H, W). ``geometry`` is view 0's; every view's geometry, the view names
and the sample's key travel in ``targets`` under ``VIEW_GEOMETRY``, ``VIEW_NAMES`` and ``KEY``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fcache.store import FeatureStore

KEY = "key"  # the sample's source id (samples/key)
VIEW_GEOMETRY = "view_geometry"  # (V, len(GEOMETRY_FIELDS)) float32
VIEW_NAMES = "view_names"  # the V names of manifest.view_names


class AllViews(Dataset):
    """Ok samples of ``store`` with all their views: video clip x crop views, or an image's plain view and its test views."""

    def __init__(self, store: FeatureStore, levels: Sequence[str], targets: Sequence[str]) -> None:
        self.store, self.levels, self.targets = store, tuple(levels), tuple(targets)
        self.indices = np.asarray(store.ok_indices, dtype=np.int64)
        self.view_names = tuple(store.manifest.view_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = int(self.indices[j])
        geometry = self.store.geometry_array[i]  # (V, fields)
        targets: dict[str, Any] = {name: self.store.target(name, i) for name in self.targets}
        targets |= {KEY: str(self.store.keys[i]), VIEW_GEOMETRY: geometry.copy(), VIEW_NAMES: self.view_names}
        return {
            "index": i,
            "view": 0,
            "features": {lv: torch.from_numpy(self.store.read(lv, i)) for lv in self.levels},  # (V, ...)
            "geometry": torch.from_numpy(geometry[0].copy()),
            "targets": targets,
        }
