"""FPN with residual blocks inside (the paper's Table 2 "FPN w. 4x Residual Blocks inside").

The paper does not say where the blocks go. Our reading: each pyramid level gets its own stack of ``blocks``
residual blocks ``x + norm(conv3x3(ReLU(norm(conv3x3(x)))))``, placed inside torchvision's FPN right after that
level's 3x3 output conv and before the extra max-pool level, so the extra level is pooled from the refined top
level. Weights are per level, not shared. There is no activation after the sum (the FPN's outputs are linear too)
and the last norm of each block starts at zero (Goyal et al., 2017), so at initialisation the neck computes
exactly the plain FPN and training adds capacity from there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fcache.spec import LevelSpec
from fcache.train_heads.necks.base import norm_layer
from fcache.train_heads.necks.fpn import FPN


class ResidualBlock(nn.Module):
    """Two 3x3 conv-norm layers (ReLU between) added to the input; the residual branch starts at zero."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        last = norm_layer(norm, channels)
        nn.init.zeros_(last.weight)
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            last,
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)  # (B, C, H, W)


class FPNRes(FPN):
    """torchvision's FPN with ``blocks`` residual blocks appended to every level's output conv."""

    def __init__(self, levels: Sequence[LevelSpec], *, channels: int = 256, blocks: int = 4, norm: str = "gn") -> None:
        super().__init__(levels, channels=channels)
        for i, conv in enumerate(self.fpn.layer_blocks):
            self.fpn.layer_blocks[i] = nn.Sequential(conv, *(ResidualBlock(channels, norm) for _ in range(blocks)))
