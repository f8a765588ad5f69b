"""FPN neck (Lin et al., 2017): torchvision's FeaturePyramidNetwork over the stored levels + one extra level by max-pool.

The extra level is torchvision's LastLevelMaxPool (1x1 max-pool, stride 2) of the top output, as in Mask R-CNN.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fcache.spec import LevelSpec
from fcache.train_heads.necks.base import Neck, Tap, at_level, pyramid_levels


class FPN(Neck):
    """Lateral 1x1 + top-down nearest upsampling + 3x3 output convs (torchvision), outputs ``channels`` wide."""

    def __init__(self, levels: Sequence[LevelSpec], *, channels: int = 256) -> None:
        super().__init__()
        self.in_levels, self.out_levels = pyramid_levels(levels, channels)
        self.fpn = FeaturePyramidNetwork([lv.channels for lv in self.in_levels], channels, extra_blocks=LastLevelMaxPool())

    def forward(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        x = OrderedDict((lv.name, features[lv.name]) for lv in self.in_levels)  # level -> (B, C_l, H_l, W_l)
        out = self.fpn(x)  # stored names + "pool", each (B, channels, H_l, W_l)
        return OrderedDict(zip((lv.name for lv in self.out_levels), out.values(), strict=True))

    def taps(self) -> list[Tap]:
        """Each level's output conv (``F1``); with residual blocks inside, the conv then each block (``conv``, ``R1``...)."""
        out = []
        for lv, block in zip(self.in_levels, self.fpn.layer_blocks, strict=True):
            parts = list(block) if isinstance(block, nn.Sequential) else [block]
            for k, part in enumerate(parts):
                label = "F1" if len(parts) == 1 else ("conv" if k == 0 else f"R{k}")
                out.append(Tap(label, part, at_level(lv.name)))
        return out
