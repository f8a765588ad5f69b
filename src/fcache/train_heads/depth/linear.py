"""The linear depth probe of DINOv2 (``eval/depth/models/decode_heads/linear_head.py``, ``BNHead`` with
``classify=True``) and the loss DINOv2's depth heads train with (``losses/sigloss.py``).

The cached levels the head reads (the last by default, or several) are resized bilinearly to ``upsample`` x the finest
one's grid and concatenated; a 1x1 conv gives ``bins`` logits per pixel; depth is predicted as classification over bins
uniform over [min_depth, max_depth] with the "linear" normalisation (AdaBins'): ReLU, + 0.1, divided by the sum, depth =
the probabilities x the bin centres. DINOv2's batch norm is commented out there, so there is none here either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import LevelSpec

NORM_EPS = 0.1  # DINOv2's "linear" norm_strategy adds it to the ReLU'd logits
SIGLOSS_EPS = 1e-3  # SigLoss adds it inside its logarithms
SIGLOSS_LAMBDA = 0.15  # the share of the squared mean log error kept: Var(g) + 0.15 mean(g)^2 (AdaBins)
SIGLOSS_WEIGHT = 10.0  # DINOv2's DepthBaseDecodeHead default loss weight


def sigloss(pred: Tensor, target: Tensor) -> Tensor:
    """The scale-invariant log loss of AdaBins as DINOv2 computes it, over the pixels with a ground truth (> 0).

    Args:
        pred: depth (B, 1, H, W) or (B, H, W) in metres, positive; target: the same shape, 0 where there is no measurement.
    """
    valid = target > 0
    if int(valid.sum()) < 2:  # nothing to compare (a batch of padding): a zero that keeps the graph
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + SIGLOSS_EPS) - torch.log(target[valid] + SIGLOSS_EPS)
    return SIGLOSS_WEIGHT * torch.sqrt(torch.var(g) + SIGLOSS_LAMBDA * g.mean() ** 2)


def bins_to_depth(logits: Tensor, bins: Tensor) -> Tensor:
    """(B, K, H, W) logits over K depth bins -> (B, 1, H, W) depth: the expectation under the "linear" normalisation."""
    p = torch.relu(logits) + NORM_EPS
    p = p / p.sum(dim=1, keepdim=True)
    return torch.einsum("bkhw,k->bhw", p, bins.to(p.dtype))[:, None]


class LinearDepth(nn.Module):
    """DINOv2's linear depth probe over the stored levels ``levels``: features -> (B, 1, h, w) metres at ``stride``."""

    bins: Tensor  # (K,) the bin centres

    def __init__(self, levels: tuple[LevelSpec, ...], bins: int, upsample: int, min_depth: float, max_depth: float) -> None:
        super().__init__()
        finest = min(lv.stride for lv in levels)
        if finest % upsample:
            raise InputError(f"head linear: upsample={upsample} must divide the finest level's stride {finest} (e.g. upsample=4)")
        self.levels = tuple(lv.name for lv in levels)
        self.upsample, self.stride = upsample, finest // upsample
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv_depth = nn.Conv2d(sum(lv.channels for lv in levels), bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, bins), persistent=False)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        grids = [features[n] for n in self.levels]  # (B, C_l, h_l, w_l)
        h, w = max(x.shape[-2] for x in grids) * self.upsample, max(x.shape[-1] for x in grids) * self.upsample
        x = torch.cat([F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False) for g in grids], dim=1)
        return bins_to_depth(self.conv_depth(x), self.bins)  # (B, 1, h, w)
