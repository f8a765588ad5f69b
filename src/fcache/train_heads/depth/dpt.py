"""A DPT decoder for depth over the cached levels (Ranftl et al., "Vision Transformers for Dense Prediction", 2021),
as DINOv2's DPT depth head builds it (``eval/depth/models/decode_heads/dpt_head.py``).

Reassemble: each stage projects a level 1x1 and resamples it to its stride; a hierarchical backbone's levels are already
at their strides (resampling is the identity), while one level alone (a ViT-like store) is reassembled into four
stages as DPT does for ViT: projected to 1/8, 1/4, 1/2 and all of its channels and resampled x4, x2, x1 and x1/2
(transposed convs, a strided conv). A 3x3 conv brings every stage to ``channels``; RefineNet-style fusion blocks
(pre-activation residual conv units) fuse them coarse to fine, each upsampling x2 (bilinear, corners aligned) and
projecting 1x1; a 3x3 conv + ReLU, then the depth head (3x3 conv to half, x2 upsampling, 3x3 conv to 32, ReLU, 1x1
conv to 1), ReLU + min_depth. No norms (DINOv2's ``norm_cfg=None``). Output stride: the finest stage's / 4. One
departure: the last conv's bias starts at half the depth range. Its inputs are ReLU outputs, so with the default init
its output often starts negative everywhere, and a ReLU'd depth that starts at 0 everywhere gets no gradient: the head
would never learn (seen on random-init features: SigLoss stuck at its value for min_depth).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import LevelSpec

SINGLE_LEVEL = ((8, 4.0), (4, 2.0), (2, 1.0), (1, 0.5))  # one level: (channels divisor, resampling factor) per stage


def resample(channels: int, factor: float) -> nn.Module:
    """DPT's resize layers: x4 and x2 by transposed convs, x1/2 by a 3x3 conv of stride 2, x1 as it is."""
    if factor > 1:
        return nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
    if factor < 1:
        return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
    return nn.Identity()


class ResidualConvUnit(nn.Module):
    """ReLU, 3x3 conv, ReLU, 3x3 conv (no bias: DINOv2's ConvModules), plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's FeatureFusionBlock: the coarser path (+ a residual unit of the skip), a residual unit, x2 up, 1x1 project."""

    def __init__(self, channels: int, skip: bool) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels) if skip else None
        self.unit = ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None and self.skip_unit is not None:
            if x.shape[-2:] != skip.shape[-2:]:  # a level missing between the two: meet at the skip's size
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class DPTDepth(nn.Module):
    """DPT over the stored levels ``levels``: features -> (B, 1, h, w) metres at ``stride`` (the finest stage's / 4)."""

    def __init__(self, levels: tuple[LevelSpec, ...], channels: int, min_depth: float, max_depth: float) -> None:
        super().__init__()
        if len(levels) == 1:
            (lv,) = levels
            stages = [(lv, max(1, lv.channels // d), f) for d, f in SINGLE_LEVEL]
        else:
            stages = [(lv, lv.channels, 1.0) for lv in sorted(levels, key=lambda lv: lv.stride)]
        finest = min(lv.stride / f for lv, _, f in stages)
        if finest % 4:
            raise InputError(f"head dpt: the finest stage has stride {finest:g}; DPT needs a multiple of 4 (read coarser levels)")
        self.levels = tuple(lv.name for lv, _, _ in stages)  # fine to coarse
        self.stride, self.min_depth, self.max_depth = int(finest) // 4, min_depth, max_depth  # max: clamps predictions only
        self.projects = nn.ModuleList(nn.Conv2d(lv.channels, c, kernel_size=1) for lv, c, _ in stages)
        self.resamples = nn.ModuleList(resample(c, f) for _, c, f in stages)
        self.convs = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=3, padding=1, bias=False) for _, c, _ in stages)
        self.fusions = nn.ModuleList(FusionBlock(channels, skip=k > 0) for k in range(len(stages)))  # coarse to fine
        self.project = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.ReLU())
        half = max(1, channels // 2)
        self.head = nn.Sequential(
            nn.Conv2d(channels, half, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(half, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            last := nn.Conv2d(32, 1, kernel_size=1),
        )
        assert last.bias is not None
        nn.init.constant_(last.bias, (max_depth - min_depth) / 2)  # every pixel starts alive, mid-range

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        stages = [
            conv(res(proj(features[name])))
            for name, proj, res, conv in zip(self.levels, self.projects, self.resamples, self.convs, strict=True)
        ]  # fine to coarse, each (B, channels, h_k, w_k)
        out = self.fusions[0](stages[-1])
        for fusion, skip in zip(self.fusions[1:], reversed(stages[:-1]), strict=True):
            out = fusion(out, skip)
        return F.relu(self.head(self.project(out))) + self.min_depth  # (B, 1, h, w)
