"""How the backbone's window attention is computed: timm's SwinV2 attention through torch's fused
``scaled_dot_product_attention`` (SDPA), swapped into a built model's instances, or timm's own forward.

timm's ``WindowAttention`` (``swinv2_*``, the official port) and ``WindowMultiHeadAttention`` (``swinv2_cr_*``)
compute SwinV2's cosine attention (Liu et al. 2022, §3.2) with explicit matmuls and a softmax, materialising every
window's (heads, N, N) attention matrix. The swap computes the same function through SDPA with ``scale=1``: q
normalised and multiplied by the clamped, exponentiated per-head logit scale, k normalised, and the continuous
relative position bias (``16 * sigmoid(cpb_mlp)``, or ``swinv2_cr``'s meta MLP) plus the shifted-window mask as the
additive float mask. Same parameters, buffers and state dict; features equal within floating-point rounding.

Only instances are changed (their class becomes a subclass of timm's that overrides ``forward``); timm's classes
and every other model stay as they are, and ``set_attention(model, "timm")`` turns a model back.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import WindowAttention
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention
from torch import nn

from fcache.extract.config import check_attention

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # SwinV2's clamp of the learned logit scale (at most 100)
MASK_ELEMENTS = 1 << 24  # shifted windows: the most bias + mask values built at once (64 MB in fp32)


def cosine_window_attention(
    qkv: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """SwinV2's scaled cosine attention of windows through SDPA.

    Args:
        qkv: (3, B * nW, nH, N, d) queries, keys and values, the windows of an image consecutive (timm's order).
        logit_scale: nH learned logit scales (any shape with nH elements), clamped and exponentiated here.
        bias: (nH, N, N) relative position bias.
        mask: (nW, N, N) shifted-window mask (0 or -100), or None.

    Returns:
        (B * nW, nH, N, d).
    """
    _, bw, heads, n, d = qkv.shape
    if mask is not None:
        qkv = qkv.contiguous()  # so that q, k and v are viewed as (B, nW, nH, N, d) below
    q, k, v = qkv.unbind(0)
    scale = torch.clamp(logit_scale.reshape(heads, 1, 1), max=LOGIT_SCALE_MAX).exp()
    q = F.normalize(q, dim=-1) * scale.to(q.dtype)
    k = F.normalize(k, dim=-1)
    bias = bias.to(q.dtype)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(bw, heads, n, n), dropout_p=dropout_p, scale=1.0)
    windows = mask.shape[0]
    images = bw // windows
    q, k, v = (t.reshape(images, windows, heads, n, d) for t in (q, k, v))  # views: qkv is contiguous
    step = max(1, MASK_ELEMENTS // (heads * n * n))
    outs = []
    for w in range(0, windows, step):  # a few windows at a time: the bias plus their masks is built for them only
        part = (bias.unsqueeze(0) + mask[w : w + step].to(q.dtype).unsqueeze(1)).flatten(0, 1)  # (w * nH, N, N)
        qw, kw, vw = (t[:, w : w + step].flatten(1, 2) for t in (q, k, v))  # (B, w * nH, N, d), views
        out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=part.expand(images, -1, -1, -1), dropout_p=dropout_p, scale=1.0)
        outs.append(out.reshape(images, -1, heads, n, d))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).reshape(bw, heads, n, d)


class SdpaWindowAttention(WindowAttention):
    """timm's ``swinv2_*`` window attention (the official SwinV2 port), its attention through SDPA."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape  # (B * nW, N, C)
        if self.q_bias is None:
            qkv = self.qkv(x)
        elif self.qkv_bias_separate:
            qkv = self.qkv(x) + torch.cat((self.q_bias, cast(torch.Tensor, self.k_bias), self.v_bias))
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, cast(torch.Tensor, self.k_bias), self.v_bias)))
        qkv = qkv.reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B * nW, nH, N, d)
        table = cast(nn.Module, self.cpb_mlp)(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[cast(torch.Tensor, self.relative_position_index).view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()  # (nH, N, N)
        out = cosine_window_attention(qkv, self.logit_scale, 16 * torch.sigmoid(bias), mask, _dropout(self))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


class SdpaWindowMultiHeadAttention(WindowMultiHeadAttention):
    """timm's ``swinv2_cr_*`` window attention, its attention through SDPA."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape  # (B * nW, N, C)
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B * nW, nH, N, d)
        bias = self._relative_positional_encodings()[0]  # (nH, N, N)
        out = cosine_window_attention(qkv, self.logit_scale, bias, mask, _dropout(self))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, -1)))


def _dropout(attention: nn.Module) -> float:
    return float(cast(nn.Dropout, attention.attn_drop).p) if attention.training else 0.0


# timm's attention class -> the class computing it through SDPA
SDPA_OF: dict[type[nn.Module], type[nn.Module]] = {
    WindowAttention: SdpaWindowAttention,
    WindowMultiHeadAttention: SdpaWindowMultiHeadAttention,
}
TIMM_OF = {sdpa: timm_class for timm_class, sdpa in SDPA_OF.items()}


def set_attention(model: nn.Module, attention: str) -> int:
    """Compute ``model``'s window attention as ``attention`` says (a key of ``config.ATTENTIONS``), in place.

    Returns:
        How many attention modules compute it so now (0 for a model without SwinV2 window attention).
    """
    swap = SDPA_OF if check_attention(attention) == "sdpa" else TIMM_OF
    count = 0
    for m in model.modules():
        cls = swap.get(type(m))
        if cls is not None:
            m.__class__ = cls
        count += type(m) in swap.values()
    return count
