"""UPerNet's FPN part as mmsegmentation's ``UPerHead`` builds it (Xiao et al., ECCV 2018; mmseg ``uper_head.py``).

Laterals are 1x1 ConvModules (conv without bias, norm, ReLU) on every level but the deepest, which enters as it is:
in UPerNet it is the pyramid pooling output, already ``channels`` wide (mmseg's last lateral). Top-down, each lateral
gets the coarser one added, upsampled bilinearly (``align_corners=False``); 3x3 ConvModules then make the outputs of
every level but the deepest, which passes through. The extra level required of every neck is a 1x1 max-pool with
stride 2 of the deepest output (torchvision's LastLevelMaxPool); UPerNet does not fuse it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import LevelSpec
from fcache.train_heads.necks.base import Neck, Tap, at_level, conv_norm_relu, pyramid_levels


class UPerFPN(Neck):
    """mmseg UPerHead's laterals, top-down path and fpn convs over levels whose deepest is ``channels`` wide."""

    def __init__(self, levels: Sequence[LevelSpec], *, channels: int = 512, norm: str = "gn") -> None:
        super().__init__()
        self.in_levels, self.out_levels = pyramid_levels(levels, channels)
        top = self.in_levels[-1]
        if top.channels != channels:
            raise InputError(f"the UPerNet FPN takes its deepest level ({top.name}) {channels} wide, as the pyramid pooling gives it")
        lower = self.in_levels[:-1]
        self.lateral = nn.ModuleDict({lv.name: conv_norm_relu(lv.channels, channels, 1, norm) for lv in lower})
        self.output = nn.ModuleDict({lv.name: conv_norm_relu(channels, channels, 3, norm) for lv in lower})

    def forward(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names = [lv.name for lv in self.in_levels]
        x = [self.lateral[n](features[n]) for n in names[:-1]] + [features[names[-1]]]  # each (B, channels, H_l, W_l)
        for i in range(len(x) - 1, 0, -1):
            x[i - 1] = x[i - 1] + F.interpolate(x[i], size=x[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [self.output[n](t) for n, t in zip(names[:-1], x[:-1], strict=True)] + [x[-1]]
        outs.append(F.max_pool2d(outs[-1], 1, 2))
        return OrderedDict(zip((lv.name for lv in self.out_levels), outs, strict=True))

    def taps(self) -> list[Tap]:
        """Each fpn conv's output (``F1``) at its level; the deepest level passes through and has none."""
        return [Tap("F1", self.output[n], at_level(n)) for n in self.output]
