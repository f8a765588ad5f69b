"""Mask R-CNN and Cascade heads on 2, 3 and 4 stored levels: losses, outputs, level mapping, cascade score averaging."""

from __future__ import annotations

import pytest
import torch
from dethelpers import LEVELS

from fcache.train_heads.detection.cascade import CascadeRoIHeads
from fcache.train_heads.detection.model import NearestLevelMapper, build_detector, roi_align
from fcache.train_heads.detection.task import HEADS, parse_detection_head

SUBSETS = {2: LEVELS[2:], 3: LEVELS[1:], 4: LEVELS}
CANVAS = 128
SIZES = [(96, 128), (128, 80)]  # (valid_h, valid_w): a wide and a tall view on the square canvas
STANDARD_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
CASCADE_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_mask"} | {
    f"loss_{k}_s{s}" for k in ("classifier", "box_reg") for s in range(3)
}


def features(levels):
    torch.manual_seed(1)
    return {lv.name: torch.randn(2, lv.channels, lv.size(CANVAS), lv.size(CANVAS)) for lv in levels}


def targets():
    return [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 2]),
            "masks": torch.ones(2, 96, 128, dtype=torch.uint8),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 128, 80, dtype=torch.uint8)},
    ]


def detector(name, levels, roi):
    spec = parse_detection_head(f"{name}:channels=32,rois=32,rpn_batch=32,roi={roi}")
    torch.manual_seed(0)
    return build_detector(levels, spec.name, dict(spec.params), num_classes=3)


@pytest.mark.parametrize("n_levels", SUBSETS)
@pytest.mark.parametrize("roi", ["standard", "cascade"])
@pytest.mark.parametrize("name", HEADS)
def test_losses_and_detections(name, roi, n_levels):
    levels = SUBSETS[n_levels]
    model = detector(name, levels, roi).train()
    losses, dets = model(features(levels), SIZES, CANVAS, targets())
    assert set(losses) == (STANDARD_LOSSES if roi == "standard" else CASCADE_LOSSES) and dets == []
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.neck.parameters())

    model.eval()
    with torch.no_grad():
        _, dets = model(features(levels), SIZES, CANVAS)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, SIZES, strict=True):
        n = len(det["boxes"])
        assert 0 < n <= 100
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, 28, 28)
        assert set(det["labels"].tolist()) <= {1, 2}
        b = det["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()  # clipped to the content, not the canvas


def test_level_mapper_skips_missing_levels():
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 100, 100], [0, 0, 224, 224], [0, 0, 900, 900]])]
    # FPN eq. 1: k = floor(4 + log2(sqrt(area) / 224)) clamped: 2, 2, 4, 5
    assert NearestLevelMapper([4, 8, 16, 32])(boxes).tolist() == [0, 0, 2, 3]
    assert NearestLevelMapper([4, 16, 32])(boxes).tolist() == [0, 0, 1, 2]  # p2, p4, p5: nothing lands on p3
    assert NearestLevelMapper([8, 32])(boxes).tolist() == [0, 0, 0, 1]  # k=4 is nearer p3 than... tie -> finer


def test_roi_pool_scales_come_from_strides_not_image_sizes():
    feats = {lv.name: torch.randn(1, 16, lv.size(CANVAS), lv.size(CANVAS)) for lv in LEVELS[1:]}  # neck outputs: one width
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0], [10.0, 30.0, 120.0, 60.0]])]
    a = roi_align(LEVELS[1:], 7)(feats, boxes, [(128, 128)])
    b = roi_align(LEVELS[1:], 7)(feats, boxes, [(40, 128)])  # a first batch of wide images
    torch.testing.assert_close(a, b)


def test_cascade_averages_the_stage_scores():
    model = detector("fpn", LEVELS[1:], "cascade").eval()
    heads: CascadeRoIHeads = model.roi_heads
    biases = [torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, -1.0, 1.0]), torch.tensor([1.0, 0.5, 0.0])]
    with torch.no_grad():
        for stage, bias in zip(heads.stages, biases, strict=True):
            stage.box_predictor.cls_score.weight.zero_()
            stage.box_predictor.cls_score.bias.copy_(bias)
            stage.score_thresh = 0.0
    want = torch.stack([torch.softmax(b, 0) for b in biases]).mean(0)  # every RoI gets these class probabilities
    with torch.no_grad():
        _, dets = model(features(LEVELS[1:]), SIZES, CANVAS)
    for det in dets:
        for label in (1, 2):
            scores = det["scores"][det["labels"] == label]
            assert len(scores) and torch.allclose(scores, want[label].expand_as(scores), atol=1e-5)


def test_standard_head_parts_are_torchvisions():
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    model = detector("fpn", LEVELS, "standard")
    assert isinstance(model.rpn, RegionProposalNetwork) and isinstance(model.roi_heads, RoIHeads)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32 and model.rpn.fg_bg_sampler.batch_size_per_image == 32
    cascade = detector("fpn", LEVELS, "cascade").roi_heads
    assert [s.proposal_matcher.high_threshold for s in cascade.stages] == [0.5, 0.6, 0.7]
    assert [tuple(s.box_coder.weights) for s in cascade.stages] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
