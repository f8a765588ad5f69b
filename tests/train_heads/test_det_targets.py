"""COCO annotations into a flipped + cropped view and detections back to the original image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dethelpers import ellipse_polygon
from pycocotools import mask as mask_utils

from fcache.spec import Geometry
from fcache.train_heads.detection.targets import (
    annotation_mask,
    category_labels,
    detections_to_coco,
    masks_from_view,
    masks_to_view,
    view_targets,
)

# a 300 x 200 image resized by 0.8 (240 x 160), a 128 x 128 crop from (30, 20), mirrored
CROP = Geometry(orig_h=200, orig_w=300, scale=0.8, crop_x0=30, crop_y0=20, valid_w=128, valid_h=128, flip=1, canvas=128)
LABELS = category_labels([{"id": 9}, {"id": 2}, {"id": 5}])


def ann(cat, x, y, w, h, **kw):
    return {"category_id": cat, "bbox": [x, y, w, h], "iscrowd": 0, "segmentation": [ellipse_polygon(x, y, w, h, n=64)], **kw}


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def test_category_ids_become_contiguous_labels_sorted_by_id():
    assert LABELS == {2: 1, 5: 2, 9: 3}


def test_boxes_into_a_flipped_cropped_view():
    anns = [
        ann(5, 60, 50, 50, 40),  # inside the crop
        ann(9, 0, 0, 20, 20),  # left of the crop (x*0.8 < 30): empty after the crop
        ann(2, 190, 100, 100, 60),  # straddles the right edge of the crop
        ann(2, 70, 60, 30, 30, iscrowd=1),  # crowd: never a training target
    ]
    t = view_targets(anns, CROP, LABELS)
    # x' = 128 - (x * 0.8 - 30), y' = y * 0.8 - 20
    want = np.array(
        [
            [128 - (110 * 0.8 - 30), 50 * 0.8 - 20, 128 - (60 * 0.8 - 30), 90 * 0.8 - 20],
            [0, 100 * 0.8 - 20, 128 - (190 * 0.8 - 30), 160 * 0.8 - 20],
        ]
    )
    np.testing.assert_allclose(t["boxes"].numpy(), want, atol=1e-4)
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].dtype == torch.float32 and t["masks"].shape == (2, 128, 128) and t["masks"].dtype == torch.uint8


def test_masks_follow_their_boxes_into_the_view():
    a = ann(5, 60, 50, 50, 40)
    t = view_targets([a], CROP, LABELS)
    np.testing.assert_allclose(box_of(t["masks"][0].numpy()), t["boxes"][0].numpy(), atol=1.0)


def test_mask_round_trip_through_a_view():
    a = ann(5, 60, 50, 50, 40)
    m = annotation_mask(a, 200, 300)
    back = masks_from_view(masks_to_view(m, CROP), CROP)
    iou = (m & back).sum() / (m | back).sum()
    assert iou > 0.93, iou
    # pixels the crop cut away come back empty
    outside = annotation_mask(ann(9, 0, 0, 20, 20), 200, 300)
    assert masks_from_view(masks_to_view(outside, CROP), CROP).sum() == 0


@pytest.mark.parametrize("form", ["compressed", "uncompressed"])
def test_rle_and_polygon_decode_alike(form):
    a = ann(5, 60, 50, 50, 40)
    poly = annotation_mask(a, 200, 300)
    if form == "compressed":
        rle = mask_utils.encode(np.asfortranarray(poly))
        seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    else:  # COCO's iscrowd form: counts as a list of run lengths, column-major
        flat = poly.ravel(order="F")
        edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
        seg = {"size": [200, 300], "counts": np.diff(np.r_[0, edges]).tolist()}
    np.testing.assert_array_equal(annotation_mask({**a, "segmentation": seg}, 200, 300), poly)


def test_detections_map_back_to_original_coordinates():
    a = ann(5, 60, 50, 50, 40)
    t = view_targets([a], CROP, LABELS)
    det = {
        "boxes": t["boxes"],
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.9]),
        "masks": torch.ones(1, 1, 28, 28),  # a full box mask
    }
    (rec,) = detections_to_coco(det, CROP, image_id=42, category_ids=[2, 5, 9])
    assert rec["image_id"] == 42 and rec["category_id"] == 5 and rec["score"] == pytest.approx(0.9)
    np.testing.assert_allclose(rec["bbox"], [60, 50, 50, 40], atol=1e-3)
    assert rec["segmentation"]["size"] == [200, 300]
    np.testing.assert_allclose(mask_utils.toBbox(rec["segmentation"]), [60, 50, 50, 40], atol=2.0)
    # torchvision's paste_masks_in_image pads the 28 x 28 mask by one cell, so a full mask bleeds ~1/28 past its box
    assert int(mask_utils.area(rec["segmentation"])) == pytest.approx(50 * 40, rel=0.12)


def test_unknown_category_is_an_error():
    with pytest.raises(ValueError, match="category ids \\[4\\]"):
        view_targets([ann(4, 60, 50, 50, 40)], CROP, LABELS)
