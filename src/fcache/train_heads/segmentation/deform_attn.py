"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021) in pure PyTorch.

``ms_deform_attn`` is the reference formulation (Deformable DETR's ``ms_deform_attn_core_pytorch``, written here
from the paper): each query samples ``P`` points per head and level around its reference point with
``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) and sums them with softmax weights. A faster
kernel can be dispatched from ``ms_deform_attn`` later; this module imports nothing optional.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError


def ms_deform_attn(value: Tensor, shapes: Sequence[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Sample and weight the value maps.

    Args:
        value: (N, S, M, D) values of all levels flattened (S = sum of H_l * W_l), M heads of D channels.
        shapes: (H_l, W_l) of each of the L levels, in the order they are flattened in ``value``.
        locations: (N, Lq, M, L, P, 2) sampling points (x, y) in [0, 1] of each level's map.
        weights: (N, Lq, M, L, P) attention weights (softmax over L * P per query and head).

    Returns:
        (N, Lq, M * D).
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)  # (N*M, D, H, W)
        grid = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, points, 2)  # (N*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))  # (N*M, D, Lq, P)
    attn = weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Deformable attention over L levels: offsets and weights predicted from the query, values projected per head."""

    def __init__(self, channels: int, levels: int, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise InputError(f"channels={channels} must be divisible by the {heads} attention heads")
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(channels, heads * levels * points * 2)
        self.attention_weights = nn.Linear(channels, heads * levels * points)
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on rings around the reference point, one direction per head; uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
        grid = (grid / grid.abs().max(-1, keepdim=True).values).view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)  # point k at distance k
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        """(N, Lq, C) queries with (N, Lq, L, 2) reference points in [0, 1] attend to (N, S, C) values -> (N, Lq, C)."""
        n, lq, c = query.shape
        v = self.value_proj(value).view(n, value.shape[1], self.heads, c // self.heads)  # (N, S, M, D)
        offsets = self.sampling_offsets(query).view(n, lq, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(n, lq, self.heads, self.levels * self.points).softmax(-1)
        weights = weights.view(n, lq, self.heads, self.levels, self.points)
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)  # (L, 2) as (x, y)
        locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(v, shapes, locations, weights))
