"""What every neck shares: the pyramid it reads (stored levels) and writes (the same + one extra level), norm layers.

A neck maps ``{level: (B, C_l, H_l, W_l)}`` for its input levels to ``{level: (B, channels, H_l, W_l)}`` for
its output levels, ordered fine to coarse. Its ``in_levels``/``out_levels`` are LevelSpecs, like a store's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from fcache.common.errors import InputError
from fcache.spec import LevelSpec, level_name

NORMS = ("gn", "bn")
GN_GROUPS = 32


def pyramid_levels(levels: Sequence[LevelSpec], channels: int) -> tuple[tuple[LevelSpec, ...], tuple[LevelSpec, ...]]:
    """Input levels sorted by stride, and the output pyramid: those at ``channels`` plus one extra level at twice the top stride.

    Raises:
        ValueError: fewer than 2 levels, or two levels of the same stride.
    """
    ins = tuple(sorted(levels, key=lambda lv: lv.stride))
    if len(ins) < 2:
        have = ", ".join(lv.name for lv in ins) or "none"
        raise InputError(f"a detection neck needs at least 2 feature levels (p2..p5); it was given: {have}")
    strides = [lv.stride for lv in ins]
    if len(set(strides)) != len(strides):
        raise InputError(f"feature levels {', '.join(lv.name for lv in ins)} repeat a stride")
    top = 2 * ins[-1].stride
    outs = tuple(LevelSpec(lv.name, channels, lv.stride) for lv in ins) + (LevelSpec(level_name(top), channels, top),)
    return ins, outs


def at_level(level: str) -> Callable[[Tensor], dict[str, Tensor]]:
    """A block's output as the map of one level (a ``Tap``'s ``levels``)."""
    return lambda x: {level: x}


@dataclass(frozen=True)
class Tap:
    """A block whose output ``fcache cka`` compares with the neck's inputs: ``levels(output)`` -> {level: (B, C, H, W)}."""

    label: str  # e.g. F1 (BiFPN layer 1), conv, R2 (residual block 2)
    module: nn.Module
    levels: Callable[[Any], Mapping[str, Tensor]]


class Neck(nn.Module):
    """A neck's contract (like timm's ``feature_info``): the stored levels it reads and the pyramid it returns."""

    in_levels: tuple[LevelSpec, ...]
    out_levels: tuple[LevelSpec, ...]

    def forward(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        raise NotImplementedError

    @property
    def learned_levels(self) -> tuple[LevelSpec, ...]:
        """Output levels computed by learned layers (an extra level that is only max-pooled is left out): what a head
        such as UPerNet fuses."""
        return self.in_levels

    def taps(self) -> list[Tap]:
        """The blocks whose outputs ``fcache cka`` compares, in forward order (the paper's Figures 3 and 5)."""
        raise NotImplementedError(f"{type(self).__name__} declares no CKA taps (Neck.taps)")


def norm_layer(kind: str, channels: int, *, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> nn.GroupNorm | nn.BatchNorm2d:
    """GroupNorm (32 groups) or BatchNorm over ``channels``."""
    if kind == "gn":
        if channels % GN_GROUPS:
            raise InputError(f"norm=gn needs channels divisible by {GN_GROUPS} (got channels={channels}); use norm=bn or change channels")
        return nn.GroupNorm(GN_GROUPS, channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels, momentum=bn_momentum, eps=bn_eps)
    raise InputError(f"norm={kind!r} is not one of {', '.join(NORMS)}")


def conv_norm_relu(cin: int, cout: int, kernel: int, norm: str) -> Conv2dNormActivation:
    """mmcv's ConvModule: a conv without bias (a norm follows), the norm, ReLU."""
    return Conv2dNormActivation(cin, cout, kernel_size=kernel, norm_layer=lambda c: norm_layer(norm, c), activation_layer=nn.ReLU)
