"""BiFPN neck (Tan et al., EfficientDet, CVPR 2020), stacked ``layers`` times over the stored levels + one extra level.

Follows the official automl/efficientdet layer: every fusion node is a fast normalised fusion
``sum_i w_i x_i / (eps + sum_j w_j)`` (w = ReLU(weights), eps = 1e-4), then SiLU, then a depthwise-separable
3x3 conv and a norm (BN as in EfficientDet, or GN: better with the small per-device batches of head training).
Inputs are projected to ``channels`` by 1x1 conv + norm; the extra level is a 3x3 stride-2 max-pool of the
projected top level (EfficientDet's resampling). Nodes resample neighbours with nearest upsampling and 3x3
stride-2 max-pooling; between stored levels more than one octave apart, adaptive max-pooling. Unlike EfficientDet,
the projected inputs are computed once and reused by both paths of the first layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from fcache.spec import LevelSpec
from fcache.train_heads.necks.base import Neck, Tap, norm_layer, pyramid_levels

FUSION_EPS = 1e-4
BN_MOMENTUM, BN_EPS = 0.01, 1e-3  # EfficientDet's (TF momentum 0.99)


def resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring (B, C, h, w) to (B, C, *size): nearest upsampling, or max-pooling down."""
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if h < size[0]:
        return F.interpolate(x, size=size, mode="nearest")
    if size == ((h + 1) // 2, (w + 1) // 2):
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    return F.adaptive_max_pool2d(x, size)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1 conv, then a norm (EfficientDet's SeparableConv2D + BN)."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            norm_layer(norm, channels, bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS),
        )


class FastFusion(nn.Module):
    """One BiFPN node: fast normalised weighted sum of same-shape inputs, SiLU, separable conv."""

    def __init__(self, inputs: int, channels: int, norm: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(inputs))
        self.conv = SeparableConv(channels, norm)

    def forward(self, xs: list[Tensor]) -> Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + FUSION_EPS)
        fused = sum(wi * x for wi, x in zip(w, xs, strict=True))  # (B, C, H, W)
        return self.conv(F.silu(fused))


class BiFPNLayer(nn.Module):
    """Top-down then bottom-up path over ``n`` levels (fine to coarse), all ``channels`` wide."""

    def __init__(self, n: int, channels: int, norm: str) -> None:
        super().__init__()
        # top_down[i] makes td_i from (in_i, td_{i+1}); bottom_up[i-1] makes out_i from (in_i, [td_i,] out_{i-1})
        self.top_down = nn.ModuleList(FastFusion(2, channels, norm) for _ in range(n - 1))
        self.bottom_up = nn.ModuleList(FastFusion(3 if i < n - 1 else 2, channels, norm) for i in range(1, n))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        n = len(xs)
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in xs]
        td = list(xs)
        for i in range(n - 2, -1, -1):
            td[i] = self.top_down[i]([xs[i], resample(td[i + 1], sizes[i])])
        out = [td[0]]
        for i in range(1, n):
            middle = [td[i]] if i < n - 1 else []
            out.append(self.bottom_up[i - 1]([xs[i], *middle, resample(out[i - 1], sizes[i])]))
        return out


class BiFPN(Neck):
    """Input projections, the extra level, then ``layers`` BiFPN layers."""

    def __init__(
        self, levels: Sequence[LevelSpec], *, channels: int = 256, layers: int = 1, norm: str = "gn", checkpoint: bool = False
    ) -> None:
        super().__init__()
        self.checkpoint = checkpoint  # activation checkpointing per layer: what makes a 5-layer BiFPN on SwinV2-G fit 16 GB
        self.in_levels, self.out_levels = pyramid_levels(levels, channels)
        self.proj = nn.ModuleDict(
            {
                lv.name: Conv2dNormActivation(
                    lv.channels,
                    channels,
                    kernel_size=1,
                    norm_layer=lambda c: norm_layer(norm, c, bn_momentum=BN_MOMENTUM, bn_eps=BN_EPS),
                    activation_layer=None,
                )
                for lv in self.in_levels
            }
        )
        self.layers = nn.ModuleList(BiFPNLayer(len(self.out_levels), channels, norm) for _ in range(layers))

    def forward(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        xs = [self.proj[lv.name](features[lv.name]) for lv in self.in_levels]  # each (B, channels, H_l, W_l)
        xs.append(F.max_pool2d(xs[-1], kernel_size=3, stride=2, padding=1))  # extra level, (B, channels, ceil(H/2), ceil(W/2))
        for layer in self.layers:
            if self.checkpoint and self.training and torch.is_grad_enabled():
                xs = torch.utils.checkpoint.checkpoint(layer, xs, use_reentrant=False)
            else:
                xs = layer(xs)
        return OrderedDict(zip((lv.name for lv in self.out_levels), xs, strict=True))

    @property
    def learned_levels(self) -> tuple[LevelSpec, ...]:
        return self.out_levels  # the last layer computes the extra level too, so every node is trained

    def taps(self) -> list[Tap]:
        """Every layer's outputs (``F1``, ``F2``, ...) at the stored levels."""
        names = [lv.name for lv in self.out_levels]
        stored = {lv.name for lv in self.in_levels}
        return [
            Tap(f"F{k}", layer, lambda out: {n: x for n, x in zip(names, out, strict=True) if n in stored})
            for k, layer in enumerate(self.layers, start=1)
        ]
