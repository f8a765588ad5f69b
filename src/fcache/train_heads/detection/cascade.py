"""Cascade R-CNN box heads (Cai & Vasconcelos, CVPR 2018 / TPAMI 2019) composed from torchvision RoIHeads.

Three stages trained at IoU 0.5/0.6/0.7 with box-regression weights (10,10,5,5), (20,20,10,10), (30,30,15,15)
and loss weights 1, 0.5, 0.25; each stage is a box-only torchvision RoIHeads (its own Matcher, BoxCoder,
BalancedPositiveNegativeSampler, TwoMLPHead) whose sampling re-adds ground truth as in the TPAMI version. Boxes
refined by a stage are the next stage's proposals (detached). Regression is class-agnostic, as in the reference
implementation; the predictor repeats its 4 deltas per class so torchvision's fastrcnn_loss and
postprocess_detections apply unchanged. Inference averages the three stages' class probabilities and decodes
the last stage's boxes. The mask head (torchvision Mask R-CNN) runs on the last stage only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class AgnosticBoxPredictor(nn.Module):
    """Class scores (R, K+1) and one class-agnostic box delta per RoI, repeated to torchvision's (R, 4 * (K+1)) layout."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)  # (R, D)
        return self.cls_score(x), self.bbox_pred(x).repeat(1, self.num_classes)


class CascadeRoIHeads(nn.Module):
    """Cascade of box-only RoIHeads stages plus a Mask R-CNN mask branch on the last stage.

    Same call contract as torchvision's RoIHeads: ``(features, proposals, image_shapes, targets) -> (detections, losses)``.
    """

    def __init__(
        self,
        stages: Sequence[RoIHeads],
        *,
        loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        mask_roi_pool: nn.Module,
        mask_head: nn.Module,
        mask_predictor: nn.Module,
    ) -> None:
        super().__init__()
        if len(stages) != len(loss_weights):
            raise ValueError(f"{len(stages)} cascade stages but {len(loss_weights)} loss weights")
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(loss_weights)
        self.mask_roi_pool, self.mask_head, self.mask_predictor = mask_roi_pool, mask_head, mask_predictor

    @property
    def heads(self) -> list[RoIHeads]:
        """The stages, typed."""
        return cast("list[RoIHeads]", list(self.stages))

    @staticmethod
    def _run_stage(
        stage: RoIHeads, features: dict[str, Tensor], proposals: list[Tensor], shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        x = stage.box_head(stage.box_roi_pool(features, proposals, shapes))  # (R, D)
        return stage.box_predictor(x)  # (R, K+1), (R, 4 * (K+1))

    @staticmethod
    def _refine(stage: RoIHeads, deltas: Tensor, proposals: list[Tensor], shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The stage's boxes (agnostic deltas = the first 4 columns), clipped, detached: next stage's proposals."""
        boxes = stage.box_coder.decode(deltas[:, :4].detach(), proposals).reshape(-1, 4)  # (R, 4)
        per_image = boxes.split([len(p) for p in proposals])
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(per_image, shapes, strict=True)]

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads needs targets in training mode")
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _losses(
        self, features: dict[str, Tensor], proposals: list[Tensor], shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for k, (stage, weight) in enumerate(zip(self.heads, self.loss_weights, strict=True)):
            props, matched, labels, reg_targets = stage.select_training_samples(proposals, targets)
            logits, deltas = self._run_stage(stage, features, props, shapes)
            loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, reg_targets)
            losses[f"loss_classifier_s{k}"] = weight * loss_cls
            losses[f"loss_box_reg_s{k}"] = weight * loss_box
            proposals = self._refine(stage, deltas, props, shapes)
        positive = [torch.where(lab > 0)[0] for lab in labels]  # the last stage's positives (IoU >= 0.7)
        mask_props = [p[i] for p, i in zip(props, positive, strict=True)]
        mask_matched = [m[i] for m, i in zip(matched, positive, strict=True)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_props, shapes)))  # (P, K+1, 28, 28)
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_props, gt_masks, gt_labels, mask_matched)
        return losses

    def _detect(self, features: dict[str, Tensor], proposals: list[Tensor], shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        probs = []
        for k, stage in enumerate(self.heads):
            logits, deltas = self._run_stage(stage, features, proposals, shapes)
            probs.append(F.softmax(logits, -1))  # (R, K+1)
            if k < len(self.stages) - 1:
                proposals = self._refine(stage, deltas, proposals, shapes)
        mean = torch.stack(probs).mean(0)
        # postprocess_detections applies softmax; log(p) of a distribution softmaxes back to p
        log_mean = mean.clamp_min(torch.finfo(mean.dtype).tiny).log()
        last = self.heads[-1]
        boxes, scores, labels = last.postprocess_detections(log_mean, deltas, proposals, shapes)
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, shapes)))
        masks = maskrcnn_inference(mask_logits, labels)  # per image (D, 1, 28, 28)
        return [{"boxes": b, "labels": lab, "scores": s, "masks": m} for b, lab, s, m in zip(boxes, labels, scores, masks, strict=True)]
