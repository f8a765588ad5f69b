"""Views: plain fit, seeded jitter, test views, video crops, and pixels landing where the geometry says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcache.extract.views import expand_test_views, image_views, render, video_views
from fcache.spec import Preprocessing

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def picture(h=90, w=160, box=(40, 20, 100, 60)):
    """A dark image with one bright rectangle at box (x0, y0, x1, y1)."""
    img = np.full((h, w, 3), 10, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 250
    return img, np.array([box], dtype=np.float64)


def bright_box(view: torch.Tensor) -> np.ndarray:
    ys, xs = np.nonzero(view[0].numpy() > 0.5)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def test_plain_view_fits_longest_side_and_pads():
    img, box = picture()
    (g,) = image_views(90, 160, Preprocessing(), 128, "k")
    assert (g.scale, g.valid_w, g.valid_h, g.canvas, g.flip) == (0.8, 128, 72, 128, 0)
    v = render(img, g, MEAN, STD)
    assert v.shape == (3, 128, 128)
    assert torch.all(v[:, 72:] == 0) and v[:, :72].min() > 0  # padding below the content
    np.testing.assert_allclose(bright_box(v), g.boxes_to_view(box)[0], atol=1)


@pytest.mark.parametrize("key", ["a", "b", "c", "d", "e", "f"])
def test_jittered_views_put_pixels_where_the_geometry_says(key):
    img, box = picture()
    pre = Preprocessing(views=3, view_scale=(0.8, 2.0), view_flip=True, seed=5)
    for g in image_views(90, 160, pre, 128, key):
        assert 0.8 * 0.8 <= g.scale <= 2.0 * 0.8
        assert 0 < g.valid_w <= 128 and 0 < g.valid_h <= 128
        want = g.boxes_to_view(box)[0]
        v = render(img, g, MEAN, STD)
        if (want[2] - want[0]) < 3 or (want[3] - want[1]) < 3:
            continue  # the rectangle was cropped away
        np.testing.assert_allclose(bright_box(v), want, atol=1.5)
        np.testing.assert_allclose(g.boxes_from_view(g.boxes_to_view(box, clip=False)), box)


def test_views_depend_on_seed_and_key_only():
    pre = Preprocessing(views=4, view_scale=(0.1, 2.0), view_flip=True, seed=1)
    a = image_views(300, 200, pre, 256, "img1")
    assert a == image_views(300, 200, pre, 256, "img1")
    assert a != image_views(300, 200, pre, 256, "img2")
    assert a != image_views(300, 200, Preprocessing(**{**pre.to_dict(), "seed": 2}), 256, "img1")
    assert {g.flip for k in range(10) for g in image_views(300, 200, pre, 256, f"k{k}")} == {0.0, 1.0}


def test_test_views():
    assert expand_test_views(("flip", "ms")) == ("flip", "s0.5", "s0.5+flip", "s0.75", "s0.75+flip")
    with pytest.raises(ValueError, match="unknown test view"):
        expand_test_views(("rotate",))
    img, box = picture()
    pre = Preprocessing(test_views=expand_test_views(("flip", "ms")))
    views = image_views(90, 160, pre, 128, "k")
    assert [g.flip for g in views] == [0, 1, 0, 1, 0, 1]
    assert [round(g.scale / views[0].scale, 2) for g in views] == [1, 1, 0.5, 0.5, 0.75, 0.75]
    flipped = render(img, views[1], MEAN, STD)
    np.testing.assert_allclose(bright_box(flipped), views[1].boxes_to_view(box)[0], atol=1)
    np.testing.assert_allclose(bright_box(flipped)[[0, 2]], 128 - bright_box(render(img, views[0], MEAN, STD))[[2, 0]], atol=1)


def test_video_views_spread_crops_along_the_long_side():
    pre = Preprocessing(frames=4, clips=2, crops=3)
    views = video_views(120, 200, pre, 64, [(0.0, 1.0), (1.0, 2.0)])
    assert len(views) == 6
    assert [g.crop_x0 for g in views[:3]] == [0, 22, 43]  # short side 120 -> 64, long side 200 -> 107
    assert all(g.valid_w == 64 and g.valid_h == 64 for g in views)
    assert [g.t_start for g in views] == [0, 0, 0, 1, 1, 1]
