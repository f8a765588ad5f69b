"""Mask R-CNN (He et al., 2017) on cached features, assembled from torchvision parts without GeneralizedRCNN.

neck (fpn | fpn-res | bifpn) -> RegionProposalNetwork -> RoIHeads (standard Mask R-CNN or Cascade). Settings are
torchvision's maskrcnn_resnet50_fpn defaults; anchors are 8 x stride per level (32 at stride 4 ... 512 at 64);
the mask head is as wide as the pyramid (``channels``, 256 by default as in torchvision).
The ImageList is built from the stored geometry: ``tensors`` only carries the canvas shape, ``image_sizes`` the
valid region of each view, so proposals are clipped to image content and never to padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

from fcache.spec import LevelSpec
from fcache.train_heads.detection.cascade import STAGE_IOUS, STAGE_REG_WEIGHTS, AgnosticBoxPredictor, CascadeRoIHeads
from fcache.train_heads.necks import NECKS, Neck

REPRESENTATION = 1024  # TwoMLPHead width
MASK_CONVS = 4  # MaskRCNNHeads: 4 3x3 convs as wide as the pyramid (256 by default, torchvision's width)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


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


def roi_align(levels: Sequence[LevelSpec], size: int) -> MultiScaleRoIAlign:
    """MultiScaleRoIAlign whose scales come from the level strides, not inferred from image sizes.

    torchvision infers them once from the first batch's largest image size, which is wrong when views are padded
    (a batch of wide images has a valid height well under the canvas).
    """
    pool = MultiScaleRoIAlign([lv.name for lv in levels], size, sampling_ratio=2)
    pool.scales = [1.0 / lv.stride for lv in levels]
    pool.map_levels = NearestLevelMapper([lv.stride for lv in levels])
    return pool


def build_rpn(out_levels: Sequence[LevelSpec], channels: int, batch_size: int) -> RegionProposalNetwork:
    anchors = AnchorGenerator(tuple((8 * lv.stride,) for lv in out_levels), (ASPECT_RATIOS,) * len(out_levels))
    return RegionProposalNetwork(
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


def _box_stage(pool: nn.Module, channels: int, predictor: nn.Module, iou: float, weights: tuple[float, ...], rois: int) -> RoIHeads:
    return RoIHeads(
        pool,
        TwoMLPHead(channels * 7 * 7, REPRESENTATION),
        predictor,
        fg_iou_thresh=iou,
        bg_iou_thresh=iou,
        batch_size_per_image=rois,
        positive_fraction=0.25,
        bbox_reg_weights=weights,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )


def build_roi_heads(levels: Sequence[LevelSpec], channels: int, num_classes: int, *, roi: str, rois: int) -> nn.Module:
    """Standard Mask R-CNN RoIHeads, or the 3-stage cascade. ``num_classes`` counts the background."""
    box_pool, mask_pool = roi_align(levels, 7), roi_align(levels, 14)
    mask_head = MaskRCNNHeads(channels, [channels] * MASK_CONVS, 1)
    mask_predictor = MaskRCNNPredictor(channels, channels, num_classes)
    if roi == "standard":
        heads = _box_stage(box_pool, channels, FastRCNNPredictor(REPRESENTATION, num_classes), 0.5, (10.0, 10.0, 5.0, 5.0), rois)
        heads.mask_roi_pool, heads.mask_head, heads.mask_predictor = mask_pool, mask_head, mask_predictor
        return heads
    if roi == "cascade":
        stages = [
            _box_stage(box_pool, channels, AgnosticBoxPredictor(REPRESENTATION, num_classes), iou, weights, rois)
            for iou, weights in zip(STAGE_IOUS, STAGE_REG_WEIGHTS, strict=True)
        ]
        return CascadeRoIHeads(stages, mask_roi_pool=mask_pool, mask_head=mask_head, mask_predictor=mask_predictor)
    raise ValueError(f"roi={roi!r} is not one of standard, cascade")


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


def build_detector(levels: Sequence[LevelSpec], head: str, params: Mapping[str, Any], num_classes: int) -> Detector:
    """The detector of head family ``head`` (a NECKS key) over ``levels``; ``num_classes`` counts the background."""
    neck = NECKS[head].build(levels, params)
    channels = params["channels"]
    rpn = build_rpn(neck.out_levels, channels, params["rpn_batch"])
    roi_heads = build_roi_heads(neck.in_levels, channels, num_classes, roi=params["roi"], rois=params["rois"])
    return Detector(neck, rpn, roi_heads)
