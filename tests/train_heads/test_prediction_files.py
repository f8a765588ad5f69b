"""The per-sample files ``fcache eval`` writes (label maps, depth maps) are named after the samples' keys: keys in any
script give one file each."""

from __future__ import annotations

import numpy as np

from fcache.train_heads.data import KEY
from fcache.train_heads.depth.maps import depth_png
from fcache.train_heads.depth.task import write_depth_maps
from fcache.train_heads.segmentation.labelmaps import label_png
from fcache.train_heads.segmentation.task import write_label_maps

KEYS = ["train/猫.jpg", "train/犬.jpg", "train/鳥.jpg"]


def test_label_maps_of_cjk_named_samples_are_one_file_each(tmp_path):
    maps = [np.full((4, 5), k, np.uint8) for k in range(3)]
    write_label_maps(tmp_path, [{KEY: k} for k in KEYS], [{"labels": label_png(m, 3)} for m in maps])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train__猫.png", "train__犬.png", "train__鳥.png"])


def test_depth_maps_of_cjk_named_samples_are_one_file_each(tmp_path):
    write_depth_maps(tmp_path, [{KEY: k} for k in KEYS], [{"depth": depth_png(np.full((4, 5), k + 1.0, np.float32))} for k in range(3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["train__猫.png", "train__犬.png", "train__鳥.png"])
