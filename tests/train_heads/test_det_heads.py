"""Mask R-CNN, Cascade Mask R-CNN and HTC heads on 2, 3 and 4 stored levels: losses, outputs, level mapping, the cascade's
score and mask combination, parameter counts against mmdetection's."""

from __future__ import annotations

import pytest
import torch
from dethelpers import CANVAS, LEVELS, SIZES, detector, features, targets

from fcache.train_heads.detection.cascade import CascadeRoIHeads
from fcache.train_heads.detection.model import NearestLevelMapper, roi_align
from fcache.train_heads.detection.task import HEADS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread beats two contended ones

SUBSETS = {2: LEVELS[2:], 3: LEVELS[1:], 4: LEVELS}
STANDARD_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
CASCADE_LOSSES = {"loss_objectness", "loss_rpn_box_reg"} | {f"loss_{k}_s{s}" for k in ("classifier", "box_reg", "mask") for s in range(3)}
LOSSES = {
    "standard": STANDARD_LOSSES,
    "cascade": CASCADE_LOSSES,
    "htc": CASCADE_LOSSES,
    "htc,semantic=1": CASCADE_LOSSES | {"loss_semantic"},
}
# HTC on every neck and every number of levels, without a full grid
HTC_CASES = [("fpn", "htc", 2), ("fpn-res", "htc", 3), ("bifpn", "htc", 4)]
HTC_CASES += [("bifpn", "htc,semantic=1", 2), ("fpn", "htc,semantic=1", 3), ("fpn-res", "htc,semantic=1", 4)]
GRID = [(name, roi, n) for name in HEADS for roi in ("standard", "cascade") for n in SUBSETS]


@pytest.mark.parametrize(("name", "roi", "n_levels"), GRID + HTC_CASES)
def test_losses_and_detections(name, roi, n_levels):
    levels = SUBSETS[n_levels]
    model = detector(name, levels, roi).train()
    losses, dets = model(features(levels), SIZES, CANVAS, targets())
    assert set(losses) == LOSSES[roi] and dets == []
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


@pytest.mark.parametrize("roi", ["standard", "cascade", "htc,semantic=1"])
def test_boxes_stay_float32_under_bf16_autocast(roi):
    """As on CUDA: bf16 deltas must not round proposals, refined boxes or detections (BoxCoder casts boxes to the deltas)."""
    model = detector("fpn", LEVELS[1:], roi).train()
    heads = model.roi_heads
    pool = heads.box_roi_pool if roi == "standard" else heads.stages[0].box_roi_pool  # the cascade's stages share theirs
    seen = []
    pool.register_forward_pre_hook(lambda _m, args: seen.append({b.dtype for b in args[1]}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = model(features(LEVELS[1:]), SIZES, CANVAS, targets())
        model.eval()
        with torch.no_grad():
            _, dets = model(features(LEVELS[1:]), SIZES, CANVAS)
    assert all(torch.isfinite(v) for v in losses.values())
    assert seen and all(s == {torch.float32} for s in seen)  # every stage's RoIs, training and inference
    assert all(d["boxes"].dtype == torch.float32 for d in dets)


def test_level_mapper_skips_missing_levels():
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 100, 100], [0, 0, 224, 224], [0, 0, 900, 900]])]
    # FPN eq. 1: k = floor(4 + log2(sqrt(area) / 224)) clamped: 2, 2, 4, 5
    assert NearestLevelMapper([4, 8, 16, 32])(boxes).tolist() == [0, 0, 2, 3]
    assert NearestLevelMapper([4, 16, 32])(boxes).tolist() == [0, 0, 1, 2]  # p2, p4, p5: nothing lands on p3
    assert NearestLevelMapper([8, 32])(boxes).tolist() == [0, 0, 0, 1]  # k=4 is nearer p3 than... tie -> finer


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_pool_scales_come_from_strides_not_image_sizes(aligned):
    feats = {lv.name: torch.randn(1, 16, lv.size(CANVAS), lv.size(CANVAS)) for lv in LEVELS[1:]}  # neck outputs: one width
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0], [10.0, 30.0, 120.0, 60.0]])]
    a = roi_align(LEVELS[1:], 7, aligned=aligned)(feats, boxes, [(128, 128)])
    b = roi_align(LEVELS[1:], 7, aligned=aligned)(feats, boxes, [(40, 128)])  # a first batch of wide images
    torch.testing.assert_close(a, b)


def test_aligned_roi_pool_is_roi_align_with_the_half_pixel_offset_on_each_roi_s_level():
    """aligned=True (mmcv's RoIAlign default) pools each RoI on its FPN level with torchvision's roi_align(aligned=True);
    aligned=False is torchvision's MultiScaleRoIAlign as it is."""
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops import roi_align as tv_roi_align

    levels = LEVELS[1:]
    feats = {lv.name: torch.randn(2, 8, lv.size(CANVAS), lv.size(CANVAS)) for lv in levels}
    boxes = [torch.tensor([[8.0, 8.0, 20.0, 30.0], [0.0, 0.0, 127.0, 127.0]]), torch.tensor([[30.5, 12.25, 90.0, 64.0]])]
    got = roi_align(levels, 7, sampling_ratio=0, aligned=True)(feats, boxes, [(128, 128)] * 2)
    which = NearestLevelMapper([lv.stride for lv in levels])(boxes).tolist()
    rois = [(0, boxes[0][0]), (0, boxes[0][1]), (1, boxes[1][0])]
    for r, ((image, box), k) in enumerate(zip(rois, which, strict=True)):
        lv = levels[k]
        want = tv_roi_align(feats[lv.name][image : image + 1], [box[None]], 7, spatial_scale=1 / lv.stride, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(got[r], want[0])
    plain = MultiScaleRoIAlign([lv.name for lv in levels], 7, sampling_ratio=0)
    plain.scales, plain.map_levels = [1 / lv.stride for lv in levels], NearestLevelMapper([lv.stride for lv in levels])
    torch.testing.assert_close(roi_align(levels, 7, sampling_ratio=0, aligned=False)(feats, boxes, [(128, 128)] * 2),
                               plain(feats, boxes, [(128, 128)] * 2))  # fmt: skip
    assert not torch.allclose(got, plain(feats, boxes, [(128, 128)] * 2))


@pytest.mark.parametrize(("roi", "score"), [("cascade", "logits"), ("cascade", "probs"), ("htc", "logits")])
def test_cascade_combines_the_stage_scores(roi, score):
    model = detector("fpn", LEVELS[1:], f"{roi},score={score}").eval()
    heads: CascadeRoIHeads = model.roi_heads
    biases = [torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, -1.0, 1.0]), torch.tensor([1.0, 0.5, 0.0])]
    with torch.no_grad():
        for stage, bias in zip(heads.stages, biases, strict=True):
            stage.box_predictor.cls_score.weight.zero_()
            stage.box_predictor.cls_score.bias.copy_(bias)
            stage.score_thresh = 0.0
    if score == "logits":  # mmdetection: softmax of the mean logits
        want = torch.softmax(torch.stack(biases).mean(0), 0)
    else:
        want = torch.stack([torch.softmax(b, 0) for b in biases]).mean(0)
    with torch.no_grad():
        _, dets = model(features(LEVELS[1:]), SIZES, CANVAS)
    for det in dets:
        for label in (1, 2):
            scores = det["scores"][det["labels"] == label]
            assert len(scores) and torch.allclose(scores, want[label].expand_as(scores), atol=1e-5)


@pytest.mark.parametrize("roi", ["cascade", "htc"])
def test_inference_averages_every_stage_sigmoid_mask(roi):
    model = detector("fpn", LEVELS[1:], roi).eval()
    biases = (2.0, -1.0, 0.5)  # stage k's mask logits are its bias wherever its weights are zero
    with torch.no_grad():
        for stage, b in zip(model.roi_heads.stages, biases, strict=True):
            stage.mask_predictor.mask_fcn_logits.weight.zero_()
            stage.mask_predictor.mask_fcn_logits.bias.fill_(b)
        _, dets = model(features(LEVELS[1:]), SIZES, CANVAS)
    want = torch.tensor(biases).sigmoid().mean()
    masks = torch.cat([d["masks"] for d in dets])
    assert len(masks) and torch.allclose(masks, want.expand_as(masks))


# mmdetection's counts (80 classes, 256 channels; FINDINGS.md): 3x Shared2FCBBoxHead (class-agnostic) + 3x FCNMaskHead;
# HTC: the 2nd and 3rd mask heads with conv_res; + FusedSemanticHead (183 stuff classes) on 5 pyramid levels.
MMDET_PARAMS = {"cascade": 49_878_255, "htc": 50_009_839, "htc,semantic=1": 52_811_942}
# torchvision's MaskRCNNPredictor has a logit map for the background too: 256 + 1 more parameters per mask head
BACKGROUND_MASK_LOGITS = 3 * (256 + 1)


@pytest.mark.parametrize("roi", MMDET_PARAMS)
def test_roi_head_parameters_match_mmdetection(roi):
    model = detector("fpn", LEVELS, roi, channels=256, num_classes=81)  # 4 stored levels + the extra one: mmdetection's 5
    count = sum(p.numel() for p in model.roi_heads.parameters())
    assert count == MMDET_PARAMS[roi] + BACKGROUND_MASK_LOGITS


def test_standard_head_parts_are_torchvisions():
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    model = detector("fpn", LEVELS, "standard")
    assert isinstance(model.rpn, RegionProposalNetwork) and isinstance(model.roi_heads, RoIHeads)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32 and model.rpn.fg_bg_sampler.batch_size_per_image == 32
    cascade = detector("fpn", LEVELS, "cascade").roi_heads
    assert [s.proposal_matcher.high_threshold for s in cascade.stages] == [0.5, 0.6, 0.7]
    want = [(10, 10, 5, 5), (20, 20, 10, 10), (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067)]  # 1 / mmdetection's target stds
    assert [list(s.box_coder.weights) for s in cascade.stages] == [pytest.approx(w) for w in want]
    assert len({id(s.mask_head) for s in cascade.stages}) == 3 and len({id(s.mask_predictor) for s in cascade.stages}) == 3


def test_new_runs_follow_mmdetection_and_runs_without_the_record_keep_the_first_release_s_conventions():
    from fcache.train_heads.detection.task import DetectionTask, parse_detection_head

    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    new = DetectionTask(parse_detection_head("fpn:channels=16,roi=htc,semantic=1"), categories)
    assert new.describe()["conventions"] == "mmdetection"
    old_record = {k: v for k, v in new.describe().items() if k != "conventions"}  # a RUN of fcache 0.1
    for task, aligned, third, over_all in ((new, True, 1 / 0.067, True), (DetectionTask.from_description(old_record), False, 15.0, False)):
        model = task.build(LEVELS[1:])
        pools = [m for m in model.modules() if hasattr(m, "aligned") and hasattr(m, "featmap_names")]
        assert pools and {p.aligned for p in pools} == {aligned}
        assert model.roi_heads.aligned is aligned  # HTC's semantic RoI features
        assert model.roi_heads.stages[2].box_coder.weights[2] == pytest.approx(third)
        assert model.roi_heads.semantic_head.over_all_pixels is over_all
    assert DetectionTask.from_description(new.describe()).conventions == "mmdetection"


def test_htc_semantic_loss_averages_over_all_pixels_as_mmdetection_or_over_the_labelled_ones_as_before():
    import torch.nn.functional as F

    from fcache.spec import Targets
    from fcache.train_heads.detection.htc import FusedSemanticHead

    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 2], [Targets.IGNORE, Targets.IGNORE]]])  # (B, S, S) at the logits' size: 2 of 4 labelled
    per_pixel = F.cross_entropy(logits, torch.tensor([[[0, 2], [0, 0]]]), reduction="none")[0]  # (2, 2)
    labelled = per_pixel[0].sum()
    head = FusedSemanticHead(LEVELS[1:], 8, 3, over_all_pixels=True)
    torch.testing.assert_close(head.loss(logits, labels), labelled / 4)
    head.over_all_pixels = False
    torch.testing.assert_close(head.loss(logits, labels), labelled / 2)
