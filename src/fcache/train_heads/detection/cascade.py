"""Cascade Mask R-CNN (Cai & Vasconcelos, TPAMI 2019) as mmdetection's ``CascadeRoIHead``, from torchvision RoIHeads.

Three box stages at IoU 0.5/0.6/0.7 (box-regression weights 1 / mmdetection's target stds, ``conventions.py``), each a
torchvision RoIHeads (Matcher, BoxCoder, balanced sampler, TwoMLPHead) with its
own mask head (MaskRCNNHeads + MaskRCNNPredictor) in its ``mask_*`` fields. Training, per stage: ground truth added to
the proposals, assign + sample, box loss (cross-entropy + smooth L1 with beta 1, class-agnostic), mask loss on that
stage's positives, both times the stage weight 1 / 0.5 / 0.25; then the sampled boxes are refined (ground-truth rows
dropped, mmdetection's ``pos_is_gts``) into the next stage's proposals. Inference refines through the stages, combines
the stage class scores (``score="logits"``: mean of raw logits then softmax, mmdetection's; ``"probs"``: mean of the
stages' probabilities), decodes the last stage's boxes and averages the three mask heads' sigmoid masks on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import boxes as box_ops

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
SCORES = ("logits", "probs")
BOX_BETA = 1.0  # mmdetection's SmoothL1Loss(beta=1.0) in its cascade and htc configs (torchvision's fastrcnn_loss: 1/9)


class AgnosticBoxPredictor(nn.Module):
    """Class scores (R, K+1) and one class-agnostic box delta per RoI, repeated to torchvision's (R, 4 * (K+1)) layout.

    Initialised as mmdetection's BBoxHead: scores N(0, 0.01), deltas N(0, 0.001), zero biases.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)  # (R, D)
        return self.cls_score(x), self.bbox_pred(x).repeat(1, self.num_classes)


@dataclass
class Inputs:
    """What every stage reads: the pyramid, each image's content (h, w), and HTC's semantic embedding when it has one."""

    features: dict[str, Tensor]
    shapes: list[tuple[int, int]]
    semantic: Tensor | None = None


@dataclass
class Samples:
    """One stage's sampled RoIs, per image: boxes (R, 4), matched ground truth (R,), labels (R,) with 0 = background,
    regression targets (R, 4) and whether the RoI is a ground-truth box added to the proposals (R,)."""

    boxes: list[Tensor]
    matched: list[Tensor]
    labels: list[Tensor]
    targets: list[Tensor]
    is_gt: list[Tensor]

    def positives(self) -> tuple[list[Tensor], list[Tensor]]:
        """Boxes and matched ground-truth indices of the positive RoIs, per image."""
        keep = [lab > 0 for lab in self.labels]
        return [b[k] for b, k in zip(self.boxes, keep, strict=True)], [m[k] for m, k in zip(self.matched, keep, strict=True)]


def init_shared_fcs(box_head: TwoMLPHead) -> TwoMLPHead:
    """mmdetection's Shared2FCBBoxHead initialisation of a TwoMLPHead: xavier-uniform fc6 and fc7, zero biases."""
    for fc in (cast(nn.Linear, box_head.fc6), cast(nn.Linear, box_head.fc7)):
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
    return box_head


def box_losses(logits: Tensor, deltas: Tensor, samples: Samples, beta: float = BOX_BETA) -> tuple[Tensor, Tensor]:
    """Cross-entropy over all sampled RoIs and smooth L1 of the class-agnostic deltas of the positives, both / R."""
    labels, targets = torch.cat(samples.labels), torch.cat(samples.targets)  # (R,), (R, 4)
    pos = labels > 0
    box = F.smooth_l1_loss(deltas[pos, :4], targets[pos], beta=beta, reduction="sum") / max(1, labels.numel())
    return F.cross_entropy(logits, labels), box


def decode(stage: RoIHeads, deltas: Tensor, boxes: list[Tensor], shapes: list[tuple[int, int]]) -> list[Tensor]:
    """The stage's class-agnostic deltas (the first 4 columns) applied to ``boxes``, clipped to each image, detached."""
    out = stage.box_coder.decode(deltas[:, :4].detach(), boxes).reshape(-1, 4)  # (R, 4)
    per_image = out.split([len(b) for b in boxes])
    return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(per_image, shapes, strict=True)]


class CascadeRoIHeads(nn.Module):
    """Cascade of RoIHeads stages, each with its box and mask heads (mmdetection's Cascade Mask R-CNN).

    Same call contract as torchvision's RoIHeads: ``(features, proposals, image_shapes, targets) -> (detections, losses)``.
    Losses: ``loss_classifier_s{k}``, ``loss_box_reg_s{k}``, ``loss_mask_s{k}`` per stage k, already weighted.
    """

    def __init__(self, stages: Sequence[RoIHeads], *, loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS, score: str = "logits") -> None:
        super().__init__()
        if len(stages) != len(loss_weights):
            raise ValueError(f"{len(stages)} cascade stages but {len(loss_weights)} loss weights")
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not one of {', '.join(SCORES)}")
        if not all(s.has_mask() for s in stages):
            raise ValueError("every cascade stage needs its mask_roi_pool, mask_head and mask_predictor")
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(loss_weights)
        self.score = score

    @property
    def heads(self) -> list[RoIHeads]:
        """The stages, typed."""
        return cast("list[RoIHeads]", list(self.stages))

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        inputs = Inputs(features, list(image_shapes))
        if self.training:
            if targets is None:
                raise ValueError(f"{type(self).__name__} needs targets in training mode")
            return [], self._losses(inputs, proposals, targets)
        return self._detect(inputs, proposals), {}

    # -- the steps a stage is made of (HTC overrides the feature and mask steps) -------------------------------------
    def _sample(self, k: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> Samples:
        """mmdetection's MaxIoUAssigner + RandomSampler(add_gt_as_proposals) with stage k's Matcher and sampler."""
        stage = self.heads[k]
        gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals, strict=True)]
        candidates = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes, strict=True)]
        matched, labels = stage.assign_targets_to_proposals(candidates, gt_boxes, [t["labels"] for t in targets])
        chosen = stage.subsample(labels)
        boxes = [c[i] for c, i in zip(candidates, chosen, strict=True)]
        matched = [m[i] for m, i in zip(matched, chosen, strict=True)]
        gts = [g if len(g) else g.new_zeros(1, 4) for g in gt_boxes]
        targets_ = stage.box_coder.encode([g[m] for g, m in zip(gts, matched, strict=True)], boxes)
        is_gt = [i >= len(p) for i, p in zip(chosen, proposals, strict=True)]
        return Samples(boxes, matched, [lab[i] for lab, i in zip(labels, chosen, strict=True)], list(targets_), is_gt)

    def _box_features(self, k: int, inputs: Inputs, boxes: list[Tensor]) -> Tensor:
        return self.heads[k].box_roi_pool(inputs.features, boxes, inputs.shapes)  # (R, C, 7, 7)

    def _mask_features(self, inputs: Inputs, boxes: list[Tensor]) -> Tensor:
        return cast(nn.Module, self.heads[-1].mask_roi_pool)(inputs.features, boxes, inputs.shapes)  # (R, C, 14, 14)

    def _box_forward(self, k: int, inputs: Inputs, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        stage = self.heads[k]
        return stage.box_predictor(stage.box_head(self._box_features(k, inputs, boxes)))  # (R, K+1), (R, 4 * (K+1))

    def _mask_logits(self, k: int, x: Tensor) -> Tensor:
        """Stage k's mask logits (R, K+1, 28, 28) of mask RoI features ``x``."""
        stage = self.heads[k]
        return cast(nn.Module, stage.mask_predictor)(cast(nn.Module, stage.mask_head)(x))

    def _all_mask_logits(self, x: Tensor) -> list[Tensor]:
        """Every stage's mask logits of the same RoI features (inference)."""
        return [self._mask_logits(k, x) for k in range(len(self.stages))]

    def _box_loss(self, k: int, inputs: Inputs, samples: Samples) -> tuple[Tensor, Tensor, Tensor]:
        """Stage k's (classification loss, box loss, deltas) on its samples."""
        logits, deltas = self._box_forward(k, inputs, samples.boxes)
        return (*box_losses(logits, deltas, samples), deltas)

    def _refine(self, k: int, deltas: Tensor, samples: Samples, shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The sampled boxes regressed by stage k, ground-truth rows dropped (mmdetection's ``refine_bboxes``)."""
        with torch.no_grad():
            refined = decode(self.heads[k], deltas, samples.boxes, shapes)
        return [b[~g] for b, g in zip(refined, samples.is_gt, strict=True)]

    def _mask_loss(self, k: int, inputs: Inputs, samples: Samples, targets: list[dict[str, Tensor]]) -> Tensor:
        """Stage k's mask loss on the positives of ``samples`` (binary cross-entropy on the ground-truth class)."""
        boxes, matched = samples.positives()
        logits = self._mask_logits(k, self._mask_features(inputs, boxes))  # (P, K+1, 28, 28)
        return maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], [t["labels"] for t in targets], matched)

    # -- training and inference ----------------------------------------------------------------------------------------
    def _losses(self, inputs: Inputs, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for k, weight in enumerate(self.loss_weights):
            samples = self._sample(k, proposals, targets)
            loss_cls, loss_box, deltas = self._box_loss(k, inputs, samples)
            losses[f"loss_classifier_s{k}"], losses[f"loss_box_reg_s{k}"] = weight * loss_cls, weight * loss_box
            losses[f"loss_mask_s{k}"] = weight * self._mask_loss(k, inputs, samples, targets)
            if k < len(self.stages) - 1:
                proposals = self._refine(k, deltas, samples, inputs.shapes)
        return losses

    def _combine(self, logits: list[Tensor]) -> Tensor:
        """The stages' class logits (R, K+1) as the logits postprocess_detections softmaxes."""
        if self.score == "logits":
            return torch.stack(logits).mean(0)
        mean = torch.stack([F.softmax(x, -1) for x in logits]).mean(0)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()  # log(p) softmaxes back to p

    def _detect(self, inputs: Inputs, proposals: list[Tensor]) -> list[dict[str, Tensor]]:
        logits = []
        for k in range(len(self.stages)):
            stage_logits, deltas = self._box_forward(k, inputs, proposals)
            logits.append(stage_logits)
            if k < len(self.stages) - 1:
                proposals = decode(self.heads[k], deltas, proposals, inputs.shapes)
        boxes, scores, labels = self.heads[-1].postprocess_detections(self._combine(logits), deltas, proposals, inputs.shapes)
        masks = self._detect_masks(inputs, boxes, labels)
        return [{"boxes": b, "labels": lab, "scores": s, "masks": m} for b, lab, s, m in zip(boxes, labels, scores, masks, strict=True)]

    def _detect_masks(self, inputs: Inputs, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """Per image (D, 1, 28, 28): the mean of every stage's sigmoid mask of the detected class (``merge_aug_masks``)."""
        label = torch.cat(labels)  # (D,)
        rows = torch.arange(len(label), device=label.device)
        probs = [x[rows, label].sigmoid() for x in self._all_mask_logits(self._mask_features(inputs, boxes))]  # (D, 28, 28)
        return list(torch.stack(probs).mean(0)[:, None].split([len(b) for b in boxes]))
