"""Video heads over per-frame features of one level (paper §5.1, Table 4): linear, temporal blocks, global blocks.

The frozen image backbone sees each frame alone (spatial only); the head adds the temporal reasoning, as the paper's
spatial-then-temporal Video-Swin-style framework. Input (B, T, C, H, W), output (B, K) logits.

- ``VideoLinear``: spatio-temporal average pool + dropout + linear (the paper's "Linear", Video Swin's I3DHead).
- ``TemporalHead``: k Transformer blocks attending over the T frames at each (h, w) location (T tokens per sequence).
- ``GlobalHead``: k blocks of joint spatio-temporal attention over all T x H x W tokens.

Blocks are timm's pre-norm ViT ``Block`` (LayerNorm, multi-head self-attention with a qkv bias, MLP ratio 4, stochastic
depth rising linearly from 0 to ``drop_path`` over the k blocks as in Swin); a final LayerNorm, the mean over all
tokens, dropout and a linear classifier follow. An input projection maps C to ``dim`` (none when they are equal).
Position embeddings are learned, initialised with sin-cos tables (1-D over time; timm's 2-D table over (h, w) for the
global head, added to the temporal one) rather than ViT's N(0, 0.02): the tokens are LayerNorm-scale backbone
features, next to which 0.02 leaves time order almost invisible at the start, and a head then needs many more steps to
tell a clip from its time reversal.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.train_heads.classification.model import Classifier

HEAD_DIM = 32  # channels per attention head, as Swin (SwinV2-B's last stage: 1024 channels, 32 heads)


def sincos_table(n: int, dim: int) -> Tensor:
    """(n, dim) sinusoidal position table (Vaswani et al., 2017): sines in the first half of the channels, cosines after."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))  # (dim/2,)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * omega[None]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class VideoLinear(nn.Module):
    """Mean over frames and space, dropout, linear."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x.mean((1, 3, 4)))  # (B, T, C, H, W) -> (B, C) -> (B, K)


class BlockHead(nn.Module):
    """Projection, position embeddings, k Transformer blocks, LayerNorm, mean over tokens, classifier.

    Subclasses arrange the (B, T, C, H, W) input into token sequences (``tokens``).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        frames: int,
        blocks: int,
        dim: int,
        heads: int,
        drop_path: float = 0.2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if dim % heads or dim % 2:
            raise InputError(f"dim={dim} must be even and a multiple of heads={heads}")
        self.proj = nn.Identity() if dim == channels else nn.Linear(channels, dim)
        self.pos_time = nn.Parameter(sincos_table(frames, dim))  # (T, dim)
        rates = torch.linspace(0, drop_path, blocks).tolist()
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path=r) for r in rates))
        self.norm = nn.LayerNorm(dim)
        self.classifier = Classifier(dim, num_classes, dropout)

    def tokens(self, x: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (S, L, dim) sequences of L tokens, position embeddings added; S is a multiple of B."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        z = self.norm(self.blocks(self.tokens(x)))  # (S, L, dim)
        return self.classifier(z.reshape(b, -1, z.shape[-1]).mean(1))  # (B, S/B * L, dim) -> (B, dim) -> (B, K)


class TemporalHead(BlockHead):
    """Attention over time only: one sequence of T tokens per sample and (h, w) location."""

    def tokens(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)  # (B*H*W, T, C)
        return self.proj(seq) + self.pos_time  # (B*H*W, T, dim)


class GlobalHead(BlockHead):
    """Joint spatio-temporal attention: one sequence of T x H x W tokens per sample."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        frames: int,
        grid: tuple[int, int],
        blocks: int,
        dim: int,
        heads: int,
        drop_path: float = 0.2,
        dropout: float = 0.5,
    ) -> None:
        if dim % 4:
            raise InputError(f"dim={dim} must be a multiple of 4 (the 2-D sin-cos table of the global head)")
        super().__init__(channels, num_classes, frames=frames, blocks=blocks, dim=dim, heads=heads, drop_path=drop_path, dropout=dropout)
        self.pos_space = nn.Parameter(build_sincos2d_pos_embed(list(grid), dim))  # (H*W, dim)

    def tokens(self, x: Tensor) -> Tensor:
        b, t, c, h, w = x.shape
        seq = self.proj(x.permute(0, 1, 3, 4, 2).reshape(b, t, h * w, c))  # (B, T, H*W, dim)
        seq = seq + self.pos_time[:, None] + self.pos_space[None]
        return seq.reshape(b, t * h * w, -1)  # (B, T*H*W, dim)
