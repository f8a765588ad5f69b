"""Mask2Former's multi-scale deformable-attention pixel decoder (Cheng et al., CVPR 2022, ``MSDeformAttnPixelDecoder``).

The up-to-3 coarsest stored levels except the finest (p3, p4, p5 of p2..p5) are projected to ``channels`` (1x1
conv + GroupNorm), given sine position + level embeddings and refined jointly by ``blocks`` deformable encoder
blocks (the paper's "pixel decoder blocks": 1 or 6 in its Table 3); the finer stored levels join by an FPN path
(1x1 lateral conv + GN, add the upsampled coarser output, 3x3 conv + GN + ReLU), and a 1x1 conv of the finest
output gives the per-pixel mask features. As in the reference, no padding mask is used (valid ratios are 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import LevelSpec
from fcache.train_heads.necks.base import GN_GROUPS
from fcache.train_heads.segmentation.deform_attn import MSDeformAttn

MAX_DEFORM_LEVELS = 3


def sine_position(x: Tensor, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine position embedding of a (B, C, H, W) map: (B, C, H, W), C/2 channels for y then x."""
    b, c, h, w = x.shape
    half = c // 2
    y = torch.arange(1, h + 1, dtype=torch.float32, device=x.device) / (h + 1e-6) * 2 * math.pi
    xs = torch.arange(1, w + 1, dtype=torch.float32, device=x.device) / (w + 1e-6) * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(half, dtype=torch.float32, device=x.device) // 2) / half)
    py, px = y[:, None] / dim_t, xs[:, None] / dim_t  # (H, half), (W, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], dim=2)  # (H, W, C)
    return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(x.dtype)


def reference_points(shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """(S, L, 2) normalised (x, y) centres of every cell of every level, repeated for the L levels (valid ratios 1)."""
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
            (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
            indexing="ij",
        )
        refs.append(torch.stack([rx.reshape(-1), ry.reshape(-1)], -1))
    return torch.cat(refs)[:, None].expand(-1, len(shapes), -1)


class DeformEncoderBlock(nn.Module):
    """Post-norm encoder block: deformable self-attention, then a ReLU FFN, each with a residual and a LayerNorm."""

    def __init__(self, channels: int, levels: int, ffn: int, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        self.attn = MSDeformAttn(channels, levels, heads, points)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, channels))
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        src = self.norm1(src + self.attn(src + pos, reference, src, shapes))  # (B, S, C)
        return self.norm2(src + self.ffn(src))


def _gn_conv(cin: int, cout: int, kernel: int, relu: bool) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # detectron2's c2_xavier_fill
    layers: list[nn.Module] = [conv, nn.GroupNorm(GN_GROUPS, cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """Stored levels -> (multi-scale maps for the transformer decoder, coarse first; mask features at the finest stride)."""

    def __init__(self, levels: Sequence[LevelSpec], *, channels: int, blocks: int, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        ins = tuple(sorted(levels, key=lambda lv: lv.stride))
        if len(ins) < 2:
            raise InputError(f"mask2former needs at least 2 feature levels; it was given: {', '.join(lv.name for lv in ins) or 'none'}")
        if channels % GN_GROUPS:
            raise InputError(f"mask2former: channels={channels} must be divisible by {GN_GROUPS} (GroupNorm)")
        self.deform_levels = ins[1:][-MAX_DEFORM_LEVELS:][::-1]  # coarse first
        self.fpn_levels = tuple(lv for lv in ins if lv not in self.deform_levels)[::-1]  # coarse to fine
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(lv.channels, channels, 1), nn.GroupNorm(GN_GROUPS, channels)) for lv in self.deform_levels
        )
        self.level_embed = nn.Parameter(torch.empty(len(self.deform_levels), channels))
        self.encoder = nn.ModuleList(
            DeformEncoderBlock(channels, len(self.deform_levels), 4 * channels, heads, points) for _ in range(blocks)
        )
        self.lateral = nn.ModuleList(_gn_conv(lv.channels, channels, 1, relu=False) for lv in self.fpn_levels)
        self.output = nn.ModuleList(_gn_conv(channels, channels, 3, relu=True) for _ in self.fpn_levels)
        self.mask_features = nn.Conv2d(channels, channels, 1)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for proj in self.input_proj:
            conv = cast(nn.Conv2d, cast(nn.Sequential, proj)[0])
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(cast(Tensor, conv.bias))
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for block in self.encoder:
            cast(Any, block).attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(cast(Tensor, self.mask_features.bias))

    @property
    def mask_stride(self) -> int:
        return self.fpn_levels[-1].stride

    def forward(self, features: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        srcs = [proj(features[lv.name]) for proj, lv in zip(self.input_proj, self.deform_levels, strict=True)]  # (B, C, H_l, W_l)
        shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)  # (B, S, C)
        pos = torch.cat(
            [(sine_position(s) + self.level_embed[k][None, :, None, None]).flatten(2).transpose(1, 2) for k, s in enumerate(srcs)], dim=1
        )
        reference = reference_points(shapes, src.device)[None].expand(src.shape[0], -1, -1, -1)  # (B, S, L, 2)
        for block in self.encoder:
            src = block(src, pos, reference, shapes)
        b, _, c = src.shape
        outs = [x.transpose(1, 2).reshape(b, c, h, w) for x, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes, strict=True)]
        y = outs[-1]
        for lateral, output, lv in zip(self.lateral, self.output, self.fpn_levels, strict=True):
            x = lateral(features[lv.name])  # (B, C, H, W)
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return outs, self.mask_features(y)
