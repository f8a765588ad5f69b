"""Mask2Former for semantic segmentation (Cheng et al., CVPR 2022) on cached features: pixel decoder + masked-attention
transformer decoder + set criterion, following the reference ``MultiScaleMaskedTransformerDecoder``.

``decoder_blocks=m`` masked-attention blocks (cross-attention masked to each query's previous mask prediction, then
self-attention, then FFN; post-norm), cycling over the pixel decoder's scales coarse to fine. Our reading of the
paper's Table 3 "(m+1) x Transformer Dec.": m blocks plus the prediction made from the learnable query features
before the first block (the reference's ``DEC_LAYERS = m + 1``), so ``decoder_blocks=3`` is "(3+1)" and m + 1
predictions are deeply supervised. 100 learnable queries with learnable query positions; the pixel decoder's
width serves as hidden and mask dimension (256 by default); FFN 8x wide (2048). Semantic inference:
``einsum("qc,qhw->chw", softmax(class)[:, :-1], sigmoid(mask))`` on masks resized to the original image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import Geometry, LevelSpec
from fcache.train_heads.segmentation.criterion import set_losses
from fcache.train_heads.segmentation.pixel_decoder import PixelDecoder, sine_position
from fcache.train_heads.segmentation.targets import class_masks, to_original

HEADS = 8


class DecoderBlock(nn.Module):
    """Masked cross-attention to one scale, self-attention among queries, FFN; each residual + LayerNorm (post-norm)."""

    def __init__(self, channels: int, ffn: int, heads: int = HEADS) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, channels))
        self.norm3 = nn.LayerNorm(channels)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, q: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, attn_mask: Tensor) -> Tensor:
        """(B, Q, C) queries attend to (B, S, C) memory where ``attn_mask`` (B * heads, Q, S) is False."""
        q = self.norm1(q + self.cross(q + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0])
        k = q + query_pos
        q = self.norm2(q + self.self_attn(k, k, q, need_weights=False)[0])
        return self.norm3(q + self.ffn(q))


class MaskedDecoder(nn.Module):
    """Learnable queries refined by ``blocks`` DecoderBlocks; class and mask predictions before and after each."""

    def __init__(self, scales: int, *, channels: int, blocks: int, queries: int, num_classes: int, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.query_feat = nn.Embedding(queries, channels)
        self.query_embed = nn.Embedding(queries, channels)
        self.level_embed = nn.Embedding(scales, channels)
        self.blocks = nn.ModuleList(DecoderBlock(channels, 8 * channels, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(channels)
        self.class_embed = nn.Linear(channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
        )

    def _predict(self, q: Tensor, mask_features: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits (B, Q, K+1), mask logits (B, Q, H, W) and the next block's attention mask (B * heads, Q, h * w)."""
        x = self.norm(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        outside = F.interpolate(masks, size=size, mode="bilinear", align_corners=False).sigmoid().flatten(2) < 0.5  # (B, Q, hw)
        outside[outside.all(-1)] = False  # a query whose mask is empty attends everywhere
        return self.class_embed(x), masks, outside.repeat_interleave(self.heads, dim=0).detach()

    def forward(self, scales: Sequence[Tensor], mask_features: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``scales`` (B, C, H_l, W_l) coarse first; returns m + 1 class-logit and mask-logit predictions."""
        b = mask_features.shape[0]
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in scales]
        memory = [x.flatten(2).transpose(1, 2) + self.level_embed.weight[k][None, None] for k, x in enumerate(scales)]  # (B, HW, C)
        pos = [sine_position(x).flatten(2).transpose(1, 2) for x in scales]
        q = self.query_feat.weight[None].expand(b, -1, -1)  # (B, Q, C)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        logits, masks, attn = self._predict(q, mask_features, sizes[0])
        all_logits, all_masks = [logits], [masks]
        for i, block in enumerate(self.blocks):
            level = i % len(scales)
            q = block(q, query_pos, memory[level], pos[level], attn)
            logits, masks, attn = self._predict(q, mask_features, sizes[(i + 1) % len(scales)])
            all_logits.append(logits)
            all_masks.append(masks)
        return all_logits, all_masks


class Mask2Former(nn.Module):
    """PixelDecoder -> MaskedDecoder over 2 or more stored levels, with the set criterion and semantic inference."""

    def __init__(
        self, levels: Sequence[LevelSpec], *, pixel_blocks: int, decoder_blocks: int, channels: int, queries: int, num_classes: int
    ) -> None:
        super().__init__()
        if channels % HEADS:
            raise InputError(f"mask2former: channels={channels} must be divisible by the {HEADS} attention heads")
        self.num_classes = num_classes
        self.pixel_decoder = PixelDecoder(levels, channels=channels, blocks=pixel_blocks)
        self.decoder = MaskedDecoder(
            len(self.pixel_decoder.deform_levels), channels=channels, blocks=decoder_blocks, queries=queries, num_classes=num_classes
        )

    @property
    def stride(self) -> int:
        return self.pixel_decoder.mask_stride

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """``logits``: m + 1 tensors (B, Q, K+1); ``masks``: m + 1 tensors (B, Q, H, W) at the finest stored stride."""
        scales, mask_features = self.pixel_decoder(features)
        logits, masks = self.decoder(scales, mask_features)
        return {"logits": logits, "masks": masks}

    def losses(self, out: Mapping[str, list[Tensor]], labels: Tensor) -> dict[str, Tensor]:
        """Set-prediction losses against (B, S, S) int64 canvas labels (each class present = one target mask)."""
        h, w = out["masks"][0].shape[-2:]
        return set_losses(out["logits"], out["masks"], class_masks(labels, (h * self.stride, w * self.stride)))

    def probabilities(self, out: Mapping[str, list[Tensor]], j: int, g: Geometry) -> Tensor:
        """(K, orig_h, orig_w) semantic scores of view ``j`` from the last prediction."""
        cls = out["logits"][-1][j].float().softmax(-1)[:, :-1]  # (Q, K)
        masks = to_original(out["masks"][-1][j], self.stride, g).sigmoid()  # (Q, orig_h, orig_w)
        with torch.autocast(device_type=masks.device.type, enabled=False):  # float32 scores, also under bf16 autocast
            return torch.einsum("qc,qhw->chw", cls, masks)


def build_mask2former(levels: Sequence[LevelSpec], p: Mapping[str, Any], num_classes: int) -> Mask2Former:
    return Mask2Former(
        levels,
        pixel_blocks=p["pixel_blocks"],
        decoder_blocks=p["decoder_blocks"],
        channels=p["channels"],
        queries=p["queries"],
        num_classes=num_classes,
    )
