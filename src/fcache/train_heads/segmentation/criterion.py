"""Mask2Former's set criterion (Cheng et al., CVPR 2022): Hungarian matching and point-sampled mask losses.

Matching per image with ``scipy.optimize.linear_sum_assignment`` on ``2 * class + 5 * mask + 5 * dice`` costs, the
mask terms (sigmoid BCE, dice) computed on K = 12544 points drawn uniformly over the canvas. Losses, for every
prediction (the query-feature one and one per decoder block: deep supervision): cross-entropy over K + 1 classes
with weight 0.1 on no-object (x 2.0), and sigmoid BCE + dice on 12544 importance-sampled points per matched mask
(3x oversampling, 75% of the points where the prediction is least certain; x 5.0 each), normalised by the number of
target masks in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

NUM_POINTS = 12544
OVERSAMPLE = 3.0
IMPORTANCE = 0.75
CLASS_WEIGHT, MASK_WEIGHT, DICE_WEIGHT = 2.0, 5.0, 5.0
NO_OBJECT_WEIGHT = 0.1

Target = tuple[Tensor, Tensor]  # classes (n,) int64, masks (n, H, W) float in the canvas area the predictions cover
Match = tuple[Tensor, Tensor]  # matched prediction indices (k,), target indices (k,)


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of (R, C, H, W) maps at (R, P, 2) points (x, y) in [0, 1]: (R, C, P)."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, align_corners=False)[..., 0]


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE of every prediction (Q, P) against every target (n, P) over the points: (Q, n).

    BCE(x, t) = softplus(x) - x t, so the sum over points is ``softplus(x).sum() - x @ t``: one pass over (Q, P).
    """
    return (F.softplus(logits).sum(-1)[:, None] - logits @ targets.T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` of every prediction (Q, P) against every target (n, P): (Q, n)."""
    p = logits.sigmoid()
    return 1 - (2 * p @ targets.T + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


def matching_cost(logits: Tensor, masks: Tensor, target: Target, points: Tensor) -> Tensor:
    """(Q, n) cost of assigning each of Q predictions (logits (Q, K+1), mask logits (Q, h, w)) to each target mask.

    ``points`` (P, 2) in [0, 1] are shared by predictions and targets; both cover the same canvas area.
    """
    classes, tmasks = target
    pm = point_sample(masks[None], points[None])[0]  # (Q, P): the masks as channels of one map, one grid
    tm = point_sample(tmasks[None], points[None])[0]  # (n, P)
    cost_class = -logits.softmax(-1)[:, classes]
    return MASK_WEIGHT * pairwise_sigmoid_ce(pm, tm) + CLASS_WEIGHT * cost_class + DICE_WEIGHT * pairwise_dice(pm, tm)


def assign(cost: Tensor) -> Match:
    """Minimum-cost one-to-one assignment of a (Q, n) cost matrix (Q >= n): every target gets one prediction."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@torch.no_grad()
def hungarian_match(logits: Tensor, masks: Tensor, targets: Sequence[Target], num_points: int = NUM_POINTS) -> list[Match]:
    """Per image, (prediction, target) index pairs from (B, Q, K+1) logits and (B, Q, h, w) mask logits."""
    out = []
    with torch.autocast(device_type=logits.device.type, enabled=False):
        for b, target in enumerate(targets):
            if len(target[0]) == 0:
                out.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            points = torch.rand(num_points, 2, device=logits.device)
            out.append(assign(matching_cost(logits[b].float(), masks[b].float(), target, points)))
    return out


@torch.no_grad()
def uncertain_points(
    logits: Tensor, num_points: int = NUM_POINTS, oversample: float = OVERSAMPLE, importance: float = IMPORTANCE
) -> Tensor:
    """(R, P, 2) points for (R, 1, h, w) mask logits: the ``importance`` share where |logit| is smallest among
    ``oversample * P`` uniform candidates, the rest uniform (PointRend's training sampler)."""
    r = logits.shape[0]
    candidates = torch.rand(r, int(num_points * oversample), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (R, P * oversample)
    k = int(importance * num_points)
    idx = uncertainty.topk(k, dim=1).indices  # (R, k)
    chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(r, num_points - k, 2, device=logits.device)], dim=1)


def class_loss(logits: Tensor, targets: Sequence[Target], matches: Sequence[Match]) -> Tensor:
    """Cross-entropy of (B, Q, K+1) logits; unmatched queries are no-object (weight 0.1)."""
    k = logits.shape[-1] - 1
    labels = torch.full(logits.shape[:2], k, dtype=torch.int64, device=logits.device)
    for b, ((classes, _), (pi, ti)) in enumerate(zip(targets, matches, strict=True)):
        labels[b, pi.to(logits.device)] = classes[ti.to(classes.device)].to(logits.device)
    weight = torch.ones(k + 1, device=logits.device)
    weight[k] = NO_OBJECT_WEIGHT
    return F.cross_entropy(logits.float().transpose(1, 2), labels, weight)


def mask_losses(masks: Tensor, targets: Sequence[Target], matches: Sequence[Match], num_points: int = NUM_POINTS) -> tuple[Tensor, Tensor]:
    """Sigmoid BCE and dice of matched (B, Q, h, w) mask logits on importance-sampled points, summed over the matched
    masks and divided by the number of target masks in the batch."""
    pred = torch.cat([masks[b, pi.to(masks.device)] for b, (pi, _) in enumerate(matches)])[:, None].float()  # (R, 1, h, w)
    gt = torch.cat([t[1][ti.to(t[1].device)] for t, (_, ti) in zip(targets, matches, strict=True)])[:, None]  # (R, 1, H, W)
    if len(gt) == 0:
        return masks.sum() * 0.0, masks.sum() * 0.0
    n = sum(len(classes) for classes, _ in targets)
    points = uncertain_points(pred, num_points)
    p = point_sample(pred, points)[:, 0]  # (R, P)
    t = point_sample(gt.float(), points)[:, 0]
    bce = F.binary_cross_entropy_with_logits(p, t, reduction="none").mean(1).sum() / n
    s = p.sigmoid()
    dice = (1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)).sum() / n
    return bce, dice


def set_losses(
    logits: Sequence[Tensor], masks: Sequence[Tensor], targets: Sequence[Target], num_points: int = NUM_POINTS
) -> dict[str, Tensor]:
    """Weighted ``ce``, ``mask`` and ``dice`` losses summed over every prediction (deep supervision)."""
    total = {"ce": logits[0].new_zeros(()), "mask": logits[0].new_zeros(()), "dice": logits[0].new_zeros(())}
    for lg, mk in zip(logits, masks, strict=True):
        matches = hungarian_match(lg, mk, targets, num_points)
        bce, dice = mask_losses(mk, targets, matches, num_points)
        total["ce"] = total["ce"] + CLASS_WEIGHT * class_loss(lg, targets, matches)
        total["mask"] = total["mask"] + MASK_WEIGHT * bce
        total["dice"] = total["dice"] + DICE_WEIGHT * dice
    return total
