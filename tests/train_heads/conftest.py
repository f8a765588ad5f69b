"""Shared fixtures of the head-training tests: tiny synthetic detection stores and extracted segmentation stores, built once per session."""

from __future__ import annotations

import pytest
import torch
from dethelpers import LEVELS, build_detection_store
from seghelpers import build_seg_stores


def pytest_collection_modifyitems(items):
    for item in items:  # pycocotools' own use of numpy 2 (not ours)
        item.add_marker(pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"))


@pytest.fixture(scope="session")
def det_store(tmp_path_factory):
    """Two images, four levels (p2..p5, 8/12/16/8 channels), views: plain and mirrored."""
    return build_detection_store(tmp_path_factory.mktemp("det") / "train.zarr")


@pytest.fixture(scope="session")
def det_store_p345(tmp_path_factory):
    """The same images with p3..p5 only."""
    return build_detection_store(tmp_path_factory.mktemp("det345") / "p345.zarr", levels=LEVELS[1:])


@pytest.fixture(scope="session")
def seg_stores(tmp_path_factory):
    """(train, val) stores of a tiny ADE20K-style folder extracted by a random-init SwinV2-T at 128 px (see seghelpers)."""
    return build_seg_stores(tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors (faster than two contended ones on a shared CPU); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
