"""Mask R-CNN (He et al., 2017) on cached features, assembled from torchvision parts without GeneralizedRCNN.

neck (fpn | fpn-res | bifpn) -> RegionProposalNetwork -> RoI heads, one of the ROI_HEADS table: standard Mask R-CNN
(torchvision's maskrcnn_resnet50_fpn settings), Cascade Mask R-CNN or HTC (mmdetection's settings, ``cascade.py``,
``htc.py``). Anchors are 8 x stride per level (32 at stride 4 ... 512 at 64); the mask heads are as wide as the
pyramid (``channels``, 256 by default as in torchvision and mmdetection).
The ImageList is built from the stored geometry: ``tensors`` only carries the canvas shape, ``image_sizes`` the
valid region of each view, so proposals are clipped to image content and never to padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops.poolers import LevelMapper

from fcache.spec import STUFF_CLASSES, LevelSpec
from fcache.train_heads.detection.cascade import STAGE_IOUS, AgnosticBoxPredictor, CascadeRoIHeads, init_shared_fcs
from fcache.train_heads.detection.conventions import CONVENTIONS, CURRENT, Conventions, RoIPool
from fcache.train_heads.detection.htc import FusedSemanticHead, HTCMaskHead, HybridTaskCascadeRoIHeads
from fcache.train_heads.necks import NECKS, Neck

REPRESENTATION = 1024  # TwoMLPHead width
MASK_CONVS = 4  # MaskRCNNHeads: 4 3x3 convs as wide as the pyramid (256 by default, torchvision's width)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
HTC_SCORE_THRESH = 0.001  # mmdetection's htc test_cfg (cascade: 0.05)


class Float32BoxCoder(BoxCoder):
    """torchvision's BoxCoder decoding in float32. Under bf16 autocast the deltas are bf16 and BoxCoder casts the boxes to
    them, which rounds proposals and detections to steps of 4 px on a 1024 canvas."""

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


class NearestLevelMapper(LevelMapper):
    """FPN's RoI-to-level rule (eq. 1, canonical 224 at level 4), mapped to the nearest level actually present.

    For a contiguous p2..p5 this is torchvision's mapper; with a gap (e.g. p2 + p4) a RoI never lands on a missing level.
    """

    def __init__(self, strides: Sequence[int]) -> None:
        ks = [math.log2(s) for s in strides]
        super().__init__(int(min(ks)), int(max(ks)))
        self.ks = torch.tensor(ks)

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        k = super().__call__(boxlists) + self.k_min  # (R,) FPN level of each RoI
        return (k[:, None].to(self.ks.dtype) - self.ks.to(k.device)[None]).abs().argmin(dim=1)


def roi_align(levels: Sequence[LevelSpec], size: int, sampling_ratio: int = 2, *, aligned: bool) -> RoIPool:
    """MultiScaleRoIAlign whose scales come from the level strides, not inferred from image sizes.

    torchvision infers them once from the first batch's largest image size, which is wrong when views are padded
    (a batch of wide images has a valid height well under the canvas). ``sampling_ratio``: torchvision's 2, or 0
    (adaptive, mmdetection's); ``aligned``: RoIAlign's pixel-centre offset (``Conventions``).
    """
    pool = RoIPool([lv.name for lv in levels], size, sampling_ratio=sampling_ratio, aligned=aligned)
    pool.scales = [1.0 / lv.stride for lv in levels]
    pool.map_levels = NearestLevelMapper([lv.stride for lv in levels])
    return pool


def build_rpn(out_levels: Sequence[LevelSpec], channels: int, batch_size: int) -> RegionProposalNetwork:
    anchors = AnchorGenerator(tuple((8 * lv.stride,) for lv in out_levels), (ASPECT_RATIOS,) * len(out_levels))
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(channels, len(ASPECT_RATIOS)),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=batch_size,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    )
    rpn.box_coder = Float32BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    return rpn


def _box_stage(
    pool: nn.Module, channels: int, predictor: nn.Module, iou: float, weights: tuple[float, ...], rois: int, score_thresh: float = 0.05
) -> RoIHeads:
    heads = RoIHeads(
        pool,
        TwoMLPHead(channels * 7 * 7, REPRESENTATION),
        predictor,
        fg_iou_thresh=iou,
        bg_iou_thresh=iou,
        batch_size_per_image=rois,
        positive_fraction=0.25,
        bbox_reg_weights=weights,
        score_thresh=score_thresh,
        nms_thresh=0.5,
        detections_per_img=100,
    )
    heads.box_coder = Float32BoxCoder(weights)
    return heads


def _standard(neck: Neck, num_classes: int, p: Mapping[str, Any], c: Conventions) -> nn.Module:
    levels, channels = neck.in_levels, p["channels"]
    heads = _box_stage(
        roi_align(levels, 7, aligned=c.aligned), channels, FastRCNNPredictor(REPRESENTATION, num_classes), 0.5, (10.0, 10.0, 5.0, 5.0),
        p["rois"],
    )  # fmt: skip
    heads.mask_roi_pool = roi_align(levels, 14, aligned=c.aligned)
    heads.mask_head = MaskRCNNHeads(channels, [channels] * MASK_CONVS, 1)
    heads.mask_predictor = MaskRCNNPredictor(channels, channels, num_classes)
    return heads


def _cascade_stages(
    neck: Neck, num_classes: int, p: Mapping[str, Any], c: Conventions, mask_head: Callable[[int], nn.Module], score_thresh: float
) -> list[RoIHeads]:
    """Three box stages (mmdetection's RoIAlign settings and box-head initialisation), stage k with ``mask_head(k)`` and its
    own MaskRCNNPredictor (torchvision's initialisation is mmdetection's FCNMaskHead's: kaiming normal, fan out)."""
    channels = p["channels"]
    box_pool = roi_align(neck.in_levels, 7, sampling_ratio=0, aligned=c.aligned)
    mask_pool = roi_align(neck.in_levels, 14, sampling_ratio=0, aligned=c.aligned)
    stages = []
    for k, (iou, weights) in enumerate(zip(STAGE_IOUS, c.stage_reg_weights, strict=True)):
        stage = _box_stage(box_pool, channels, AgnosticBoxPredictor(REPRESENTATION, num_classes), iou, weights, p["rois"], score_thresh)
        init_shared_fcs(cast(TwoMLPHead, stage.box_head))
        stage.mask_roi_pool, stage.mask_head = mask_pool, mask_head(k)
        stage.mask_predictor = MaskRCNNPredictor(channels, channels, num_classes)
        stages.append(stage)
    return stages


def _cascade(neck: Neck, num_classes: int, p: Mapping[str, Any], c: Conventions) -> nn.Module:
    channels = p["channels"]
    stages = _cascade_stages(neck, num_classes, p, c, lambda k: MaskRCNNHeads(channels, [channels] * MASK_CONVS, 1), 0.05)
    return CascadeRoIHeads(stages, score=p["score"])


def _htc(neck: Neck, num_classes: int, p: Mapping[str, Any], c: Conventions) -> nn.Module:
    channels = p["channels"]
    stages = _cascade_stages(neck, num_classes, p, c, lambda k: HTCMaskHead(channels, MASK_CONVS, flow=k > 0), HTC_SCORE_THRESH)
    semantic = None
    if p["semantic"]:
        semantic = FusedSemanticHead(neck.out_levels, channels, STUFF_CLASSES, over_all_pixels=c.semantic_over_all_pixels)
    return HybridTaskCascadeRoIHeads(stages, score=p["score"], semantic=semantic, aligned=c.aligned)


@dataclass(frozen=True)
class RoiDef:
    """One RoI head family: how it is built over a neck (``num_classes`` counts the background) and what it follows."""

    build: Callable[[Neck, int, Mapping[str, Any], Conventions], nn.Module]
    help: str


ROI_HEADS: dict[str, RoiDef] = {
    "standard": RoiDef(_standard, "Mask R-CNN (torchvision)"),
    "cascade": RoiDef(_cascade, "Cascade Mask R-CNN, 3 stages (mmdetection)"),
    "htc": RoiDef(_htc, "Hybrid Task Cascade, 3 stages (mmdetection 2.x)"),
}


class Detector(nn.Module):
    """neck -> RPN -> RoI heads over a dict of stored feature levels."""

    def __init__(self, neck: Neck, rpn: RegionProposalNetwork, roi_heads: nn.Module) -> None:
        super().__init__()
        self.neck, self.rpn, self.roi_heads = neck, rpn, roi_heads

    def forward(
        self,
        features: Mapping[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        canvas: int,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses (training) or detections in canvas coordinates (eval).

        Args:
            features: level -> (B, C_l, H_l, W_l) for the levels the neck reads.
            image_sizes: (valid_h, valid_w) of each view's content on the canvas.
            canvas: side of the square canvas the backbone saw.
            targets: per view ``boxes`` (G, 4) xyxy canvas, ``labels`` (G,) 1..K, ``masks`` (G, valid_h, valid_w) uint8.
        """
        pyramid = self.neck(features)  # level -> (B, channels, H_l, W_l), plus the extra level
        first = next(iter(pyramid.values()))
        shape_only = first.new_zeros(()).expand(len(image_sizes), 3, canvas, canvas)  # no memory: the anchors need the shape
        images = ImageList(shape_only, [(int(h), int(w)) for h, w in image_sizes])
        proposals, rpn_losses = self.rpn(images, pyramid, targets)
        detections, roi_losses = self.roi_heads(pyramid, proposals, images.image_sizes, targets)
        return {**rpn_losses, **roi_losses}, detections


def build_detector(
    levels: Sequence[LevelSpec], head: str, params: Mapping[str, Any], num_classes: int, conventions: Conventions = CONVENTIONS[CURRENT]
) -> Detector:
    """The detector of head family ``head`` (a NECKS key) over ``levels``; ``num_classes`` counts the background."""
    neck = NECKS[head].build(levels, params)
    channels = params["channels"]
    rpn = build_rpn(neck.out_levels, channels, params["rpn_batch"])
    roi_heads = ROI_HEADS[params["roi"]].build(neck, num_classes, params, conventions)
    return Detector(neck, rpn, roi_heads)
