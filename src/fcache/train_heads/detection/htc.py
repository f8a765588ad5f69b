"""Hybrid Task Cascade (Chen et al., CVPR 2019) as mmdetection 2.x's ``HybridTaskCascadeRoIHead``, on the cascade stages.

Interleaved box and mask branches: after stage k's box loss its sampled boxes are refined (ground-truth rows dropped),
then assigned and sampled again by the same stage before its mask loss; the refined boxes are also the next stage's
proposals. Mask information flow: stage k's mask head adds ReLU(conv1x1(F_{k-1})) to its RoI features, F_{k-1} being
the previous mask head's conv features, itself computed by running heads 0..k-1 on the current RoIs (``HTCMaskHead``).
At test time every stage's mask head runs in that chain on the final boxes and their sigmoid masks are averaged
(mmdetection 2.x ``simple_test``; the 3.x code keeps the last stage's only). The optional semantic branch is
``FusedSemanticHead``: its embedding, RoI-pooled at 14 x 14, is added to the box (average-pooled to 7 x 7) and mask
RoI features; its stuff-class logits are trained with cross-entropy (255 ignored) times 0.2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align
from torchvision.ops.misc import Conv2dNormActivation

from fcache.spec import LevelSpec, Targets
from fcache.train_heads.detection.cascade import STAGE_LOSS_WEIGHTS, CascadeRoIHeads, Inputs, Samples

SEMANTIC_CONVS = 4
SEMANTIC_STRIDE = 8  # mmdetection's fusion_level=1 (P3)
SEMANTIC_ROI = 14
SEMANTIC_LOSS_WEIGHT = 0.2


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """mmcv's kaiming_init: normal, fan_out, ReLU gain, zero bias (ConvModule's and FusedSemanticHead's conv_logits)."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _conv(cin: int, cout: int, kernel: int) -> Conv2dNormActivation:
    """mmcv's ConvModule without a norm: a conv with bias, then ReLU."""
    block = Conv2dNormActivation(cin, cout, kernel, norm_layer=None)
    _kaiming(block[0])
    return block


class HTCMaskHead(nn.Module):
    """torchvision's MaskRCNNHeads (4 conv3x3), after the mask information flow when ``flow`` (mmdetection's ``HTCMaskHead``).

    ``forward(x, previous)`` returns the conv features (R, C, 14, 14), which are both the input of this stage's
    MaskRCNNPredictor and the ``previous`` of the next stage's head.
    """

    def __init__(self, channels: int, convs: int, *, flow: bool) -> None:
        super().__init__()
        self.conv_res = _conv(channels, channels, 1) if flow else None
        self.convs = MaskRCNNHeads(channels, [channels] * convs, 1)

    def forward(self, x: Tensor, previous: Tensor | None = None) -> Tensor:
        if previous is not None:
            assert self.conv_res is not None, "the first stage's mask head takes no previous features"
            x = x + self.conv_res(previous)
        return cast(Tensor, self.convs(x))


class FusedSemanticHead(nn.Module):
    """mmdetection's FusedSemanticHead over a pyramid: 1x1 laterals on every level, resized (bilinear, align_corners)
    to the fusion level and summed, 4 conv3x3, then 1x1 stuff logits and a 1x1 embedding (conv + ReLU).

    The fusion level is the one at stride 8 (P3, as mmdetection), else the finest level of the pyramid.
    """

    def __init__(
        self, levels: Sequence[LevelSpec], channels: int, num_classes: int, convs: int = SEMANTIC_CONVS, *, over_all_pixels: bool = True
    ) -> None:
        super().__init__()
        self.over_all_pixels = over_all_pixels  # the loss's mean: over all pixels (mmdetection's) or the labelled ones
        self.names = [lv.name for lv in levels]
        strides = [lv.stride for lv in levels]
        self.fusion = strides.index(SEMANTIC_STRIDE) if SEMANTIC_STRIDE in strides else strides.index(min(strides))
        self.stride = strides[self.fusion]
        self.lateral_convs = nn.ModuleList(_conv(lv.channels, channels, 1) for lv in levels)
        self.convs = nn.Sequential(*(_conv(channels, channels, 3) for _ in range(convs)))
        self.conv_logits = _kaiming(nn.Conv2d(channels, num_classes, 1))
        self.conv_embedding = _conv(channels, channels, 1)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, K_stuff, h, w) logits and (B, C, h, w) embedding at the fusion level's resolution."""
        x = self.lateral_convs[self.fusion](features[self.names[self.fusion]])
        size = tuple(x.shape[-2:])
        for i, name in enumerate(self.names):
            if i != self.fusion:
                x = x + self.lateral_convs[i](F.interpolate(features[name], size=size, mode="bilinear", align_corners=True))
        x = self.convs(x)
        return self.conv_logits(x), self.conv_embedding(x)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of (B, K, h, w) logits against (B, S, S) canvas labels resized nearest to (h, w), 255 ignored."""
        small = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()  # (B, h, w)
        if not (small != Targets.IGNORE).any():
            return logits.sum() * 0
        if self.over_all_pixels:  # ignored pixels count in the mean with a loss of 0 (CrossEntropyLoss(avg_non_ignore=False))
            return F.cross_entropy(logits, small, ignore_index=Targets.IGNORE, reduction="sum") / small.numel()
        return F.cross_entropy(logits, small, ignore_index=Targets.IGNORE)


class HybridTaskCascadeRoIHeads(CascadeRoIHeads):
    """HTC: interleaved cascade of box and mask branches with mask information flow, optionally a semantic branch.

    Losses: the cascade's per stage (``loss_mask_s{k}`` on the re-sampled positives), plus ``loss_semantic`` with it.
    """

    def __init__(
        self,
        stages: Sequence[RoIHeads],
        *,
        loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        score: str = "logits",
        semantic: FusedSemanticHead | None = None,
        semantic_loss_weight: float = SEMANTIC_LOSS_WEIGHT,
        aligned: bool = True,
    ) -> None:
        super().__init__(stages, loss_weights=loss_weights, score=score)
        self.aligned = aligned  # RoIAlign of the semantic RoI features (Conventions)
        if not all(isinstance(s.mask_head, HTCMaskHead) for s in stages):
            raise ValueError("every HTC stage needs an HTCMaskHead (with the information flow from the second on)")
        self.semantic_head = semantic
        self.semantic_loss_weight = semantic_loss_weight

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.semantic_head is None:
            return super().forward(features, proposals, image_shapes, targets)
        logits, embedding = self.semantic_head(features)
        inputs = Inputs(features, list(image_shapes), embedding)
        if not self.training:
            return self._detect(inputs, proposals), {}
        if targets is None or any(Targets.STUFF not in t for t in targets):
            raise ValueError("the HTC semantic branch needs the stuff labels of every view in training mode")
        losses = self._losses(inputs, proposals, targets)
        labels = torch.stack([t[Targets.STUFF] for t in targets])  # (B, S, S)
        losses["loss_semantic"] = self.semantic_loss_weight * self.semantic_head.loss(logits, labels)
        return [], losses

    def _semantic_rois(self, inputs: Inputs, boxes: list[Tensor]) -> Tensor:
        head = cast(FusedSemanticHead, self.semantic_head)
        assert inputs.semantic is not None
        semantic = inputs.semantic.to(boxes[0].dtype)  # boxes stay float32 under bf16 autocast
        return roi_align(  # (R, C, 14, 14)
            semantic, boxes, SEMANTIC_ROI, spatial_scale=1.0 / head.stride, sampling_ratio=0, aligned=self.aligned
        )

    def _box_features(self, k: int, inputs: Inputs, boxes: list[Tensor]) -> Tensor:
        x = super()._box_features(k, inputs, boxes)  # (R, C, 7, 7)
        if inputs.semantic is None:
            return x
        return x + F.adaptive_avg_pool2d(self._semantic_rois(inputs, boxes), (x.shape[-2], x.shape[-1]))

    def _mask_features(self, inputs: Inputs, boxes: list[Tensor]) -> Tensor:
        x = super()._mask_features(inputs, boxes)  # (R, C, 14, 14)
        return x if inputs.semantic is None else x + self._semantic_rois(inputs, boxes)

    def _mask_logits(self, k: int, x: Tensor) -> Tensor:
        """Stage k's mask logits, its head fed the features of heads 0..k-1 run on the same RoIs."""
        previous = None
        for stage in self.heads[:k]:
            previous = cast(HTCMaskHead, stage.mask_head)(x, previous)
        stage = self.heads[k]
        return cast(nn.Module, stage.mask_predictor)(cast(HTCMaskHead, stage.mask_head)(x, previous))

    def _all_mask_logits(self, x: Tensor) -> list[Tensor]:
        out, previous = [], None
        for stage in self.heads:
            previous = cast(HTCMaskHead, stage.mask_head)(x, previous)
            out.append(cast(nn.Module, stage.mask_predictor)(previous))
        return out

    def _losses(self, inputs: Inputs, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for k, weight in enumerate(self.loss_weights):
            samples: Samples = self._sample(k, proposals, targets)
            loss_cls, loss_box, deltas = self._box_loss(k, inputs, samples)
            losses[f"loss_classifier_s{k}"], losses[f"loss_box_reg_s{k}"] = weight * loss_cls, weight * loss_box
            proposals = self._refine(k, deltas, samples, inputs.shapes)
            resampled = self._sample(k, proposals, targets)
            losses[f"loss_mask_s{k}"] = weight * self._mask_loss(k, inputs, resampled, targets)
        return losses
