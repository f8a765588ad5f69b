"""Segmentation targets and metrics: labels into views (against PIL's own resampler), scores back to the original image,
mIoU / per-class IoU / accuracies against a reference computed here from boolean masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fcache.extract.views import image_views
from fcache.spec import Geometry, Preprocessing
from fcache.train_heads.headspec import HeadSpec
from fcache.train_heads.segmentation import metrics as M
from fcache.train_heads.segmentation.targets import class_masks, to_original, view_labels
from fcache.train_heads.segmentation.task import SEGMENTATION_JSON, SegmentationTask, multi_view_name

IGNORE = 255


def pil_view(label: np.ndarray, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The label map cut like ``fcache.extract.views.render`` cuts the image, but with PIL's NEAREST filter; and a mask
    of the content pixels whose sampling position falls exactly on a pixel edge (where PIL's float rounding decides)."""
    h, w = label.shape
    x0, y0, vw, vh = int(g.crop_x0), int(g.crop_y0), int(g.valid_w), int(g.valid_h)
    tie = np.zeros((vh, vw), bool)
    if (max(1, round(w * g.scale)), max(1, round(h * g.scale))) == (w, h):
        arr = label[y0 : y0 + vh, x0 : x0 + vw]
    else:
        box = (x0 / g.scale, y0 / g.scale, min(w, (x0 + vw) / g.scale), min(h, (y0 + vh) / g.scale))
        arr = np.asarray(Image.fromarray(label).resize((vw, vh), Image.Resampling.NEAREST, box=box, reducing_gap=None))
        cx = box[0] + (np.arange(vw) + 0.5) * (box[2] - box[0]) / vw
        cy = box[1] + (np.arange(vh) + 0.5) * (box[3] - box[1]) / vh
        tie = (np.abs(cy - np.round(cy)) < 1e-6)[:, None] | (np.abs(cx - np.round(cx)) < 1e-6)[None, :]
    if g.flip:
        arr, tie = arr[:, ::-1], tie[:, ::-1]
    s = int(g.canvas)
    out = np.full((s, s), IGNORE, np.uint8)
    out[:vh, :vw] = arr
    ties = np.zeros((s, s), bool)
    ties[:vh, :vw] = tie
    return out, ties


def test_labels_land_where_the_view_sampled_its_pixels():
    rng = np.random.default_rng(0)
    pre = Preprocessing(views=3, view_scale=(0.3, 2.5), view_flip=True, test_views=("flip", "s0.5", "s0.5+flip", "s0.75"))
    checked = 0
    for k in range(40):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        label = rng.integers(0, 150, (h, w)).astype(np.uint8)  # every pixel its own value: any misplaced pixel shows
        padded = np.full((130, 130), IGNORE, np.uint8)
        padded[:h, :w] = label
        for g in image_views(h, w, pre, 64, f"sample{k}"):
            ours = view_labels(padded, g)  # from the stored (Hmax, Wmax) map, padding included
            want, ties = pil_view(label, g)
            assert ours.shape == (64, 64)
            assert np.array_equal(ours[~ties], want[~ties]), (k, g)
            checked += int((~ties).sum())
    assert checked > 100_000


def test_scores_map_back_to_the_original_image():
    """Per-pixel one-hot scores of a view, mapped back, give the original labels; a mirrored view gives the same map."""
    rng = np.random.default_rng(1)
    h, w, k = 48, 72, 4
    label = np.kron(rng.integers(0, k, (6, 9)), np.ones((8, 8), np.int64)).astype(np.uint8)  # 8x8 blocks
    pre = Preprocessing(test_views=("flip", "s0.5"))
    plain, flip, half = image_views(h, w, pre, 96, "x")
    maps = {}
    for name, g in (("plain", plain), ("flip", flip), ("half", half)):
        v = torch.from_numpy(view_labels(label, g).astype(np.int64))
        onehot = torch.nn.functional.one_hot(v.clamp(max=k - 1), k).permute(2, 0, 1).float()  # (K, S, S), stride 1
        maps[name] = to_original(onehot, 1, g)  # (K, h, w)
        assert maps[name].shape == (k, h, w)
    torch.testing.assert_close(maps["flip"], maps["plain"])
    assert (maps["plain"].argmax(0).numpy() == label).mean() > 0.97
    assert (maps["half"].argmax(0).numpy() == label).mean() > 0.85  # a quarter of the pixels, blurred edges
    with pytest.raises(ValueError, match="cropped view"):
        to_original(maps["plain"], 1, Geometry(orig_h=h, orig_w=w, scale=1.0, crop_x0=4.0, valid_w=60, valid_h=48, canvas=96))


def test_class_masks_are_mask2formers_semantic_targets():
    labels = torch.tensor([[[0, 0, 3], [255, 3, 3], [1, 255, 0]]])
    ((classes, masks),) = class_masks(labels, (4, 5))
    assert classes.tolist() == [0, 1, 3] and masks.shape == (3, 4, 5)
    assert masks[:, :3, :3].sum(0).tolist() == [[1, 1, 1], [0, 1, 1], [1, 0, 1]]  # ignored pixels in no mask
    assert masks[:, 3:, :].sum() == 0 and masks[:, :, 3:].sum() == 0  # padding to the area the features cover


def reference_scores(preds: list[np.ndarray], gts: list[np.ndarray], k: int) -> dict:
    """mmseg's IoU metric from per-class boolean masks over the labelled pixels of the whole set."""
    inter, union, gt_area = np.zeros(k), np.zeros(k), np.zeros(k)
    correct = labelled = 0
    for p, g in zip(preds, gts, strict=True):
        valid = g != IGNORE
        for c in range(k):
            pc, gc = (p == c) & valid, g == c
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
            gt_area[c] += gc.sum()
        correct += ((p == g) & valid).sum()
        labelled += valid.sum()
    iou = [inter[c] / union[c] if union[c] else None for c in range(k)]
    acc = [inter[c] / gt_area[c] if gt_area[c] else None for c in range(k)]
    return {
        "mIoU": np.mean([x for x in iou if x is not None]),
        "mAcc": np.mean([x for x in acc if x is not None]),
        "aAcc": correct / labelled,
        "IoU": iou,
    }


def test_miou_equals_a_reference_on_random_label_maps(tmp_path):
    rng = np.random.default_rng(2)
    k = 6
    task = SegmentationTask(HeadSpec("upernet", ()), [f"class{c}" for c in range(k)])
    preds, gts, predictions = [], [], []
    for _ in range(5):
        h, w = (int(v) for v in rng.integers(10, 40, 2))
        g = rng.choice([0, 1, 2, 4, IGNORE], size=(h, w), p=[0.3, 0.2, 0.2, 0.2, 0.1]).astype(np.uint8)  # classes 3, 5 never present
        p = np.where(rng.random((h, w)) < 0.7, g, rng.integers(0, k - 1, (h, w))).astype(np.int64)  # 5 is never predicted either
        p[g == IGNORE] = rng.integers(0, k, int((g == IGNORE).sum()))
        preds.append(p)
        gts.append(g)
        codes = M.confusion_codes(p, g, k)
        predictions.append({"names": ("plain",), "views": [codes], "mean": codes})
    metrics = task.evaluate([{}] * 5, predictions, tmp_path)
    want = reference_scores(preds, gts, k)
    assert set(metrics) == {"ss/mIoU", "ss/mAcc", "ss/aAcc"}
    for name in ("mIoU", "mAcc", "aAcc"):
        assert metrics[f"ss/{name}"] == pytest.approx(want[name], abs=1e-12)
    report = json.loads((tmp_path / SEGMENTATION_JSON).read_text())
    got_iou = [c["IoU"] for c in report["single_scale"]["classes"]]
    assert got_iou[5] is None and got_iou[3] is not None and got_iou[3] == 0.0  # predicted but absent: IoU 0, counted
    assert got_iou == pytest.approx(want["IoU"], abs=1e-12)
    assert [c["class"] for c in report["single_scale"]["classes"]] == [f"class{c}" for c in range(k)]


def test_confusion_refuses_labels_beyond_the_head():
    with pytest.raises(ValueError, match="label 7 is outside the head's 5 classes"):
        M.confusion_codes(np.zeros((2, 2), np.int64), np.full((2, 2), 7, np.uint8), 5)


def test_the_multi_view_family_is_named_after_the_test_views():
    assert multi_view_name(("plain", "flip", "s0.5", "s0.5+flip", "s0.75", "s0.75+flip")) == "ms+flip"
    assert multi_view_name(("plain", "flip")) == "flip"
    assert multi_view_name(("plain", "s0.5", "s0.75")) == "ms"
