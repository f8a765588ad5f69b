"""The shared vocabulary: geometry mapping, manifest round trip and fingerprint differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fcache.common.errors import StoreError
from fcache.spec import GEOMETRY_FIELDS, Geometry, LevelSpec, Manifest, level_name
from helpers import make_manifest


def test_level_names_and_sizes():
    assert [level_name(s) for s in (4, 8, 16, 32)] == ["p2", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="stride 12"):
        level_name(12)
    assert LevelSpec("p2", 96, 4).size(256) == 64


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_boxes_round_trip_through_a_view(flip):
    g = Geometry(orig_h=480, orig_w=640, scale=0.75, crop_x0=40, crop_y0=10, valid_w=400, valid_h=350, flip=flip, canvas=512)
    boxes = np.array([[100, 50, 300, 200], [60, 20, 90, 400]], dtype=np.float64)
    view = g.boxes_to_view(boxes, clip=False)
    np.testing.assert_allclose(g.boxes_from_view(view), boxes)
    expected_x0 = 100 * 0.75 - 40
    if flip:
        assert view[0, 2] == pytest.approx(400 - expected_x0)  # mirrored: old left edge becomes right edge
        assert view[0, 0] < view[0, 2]
    else:
        assert view[0, 0] == pytest.approx(expected_x0)


def test_flip_mirrors_about_the_valid_region():
    g = Geometry(orig_h=100, orig_w=200, scale=1.0, valid_w=200, valid_h=100, canvas=256)
    gf = Geometry(**{**g.to_dict(), "flip": 1.0})
    b = np.array([[10, 10, 50, 60]])
    np.testing.assert_allclose(gf.boxes_to_view(b), [[150, 10, 190, 60]])
    np.testing.assert_allclose(gf.points_to_view(np.array([[10.0, 10.0]])), [[190, 10]])
    assert Geometry.from_array(g.to_array()) == g
    assert len(g.to_array()) == len(GEOMETRY_FIELDS)


def test_manifest_round_trip_and_fingerprint():
    m, _ = make_manifest(frames=4, views=2)
    d = json.loads(json.dumps(m.to_dict()))
    m2 = Manifest.from_dict(d)
    assert m2 == m and m2.fingerprint == m.fingerprint == d["fingerprint"]
    assert m2.num_views == 2 and m2.level_shape("p3") == (4, 16, 8, 8)


def test_fingerprint_ignores_paths_but_not_bytes():
    m, _ = make_manifest()
    moved = Manifest.from_dict({**m.to_dict(), "dataset": {**m.dataset.to_dict(), "root": "/elsewhere"}})
    assert moved.fingerprint == m.fingerprint
    other, _ = make_manifest(dtype="bf16", shard_size=8)
    assert m.differences(other) == ['storage.dtype: "fp16" != "bf16"', "storage.shard_size: 4 != 8"]


def test_unknown_format_version_is_refused():
    m, _ = make_manifest()
    with pytest.raises(StoreError, match="format version 2 is not supported"):
        Manifest.from_dict({**m.to_dict(), "format_version": 2})
