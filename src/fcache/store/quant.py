"""The kernels of the compact stored forms: per-channel scales chosen for the least error, bit packing, rounding.

Each form encodes in torch (on the extraction device) and decodes twice, in numpy (readers) and in torch (on the
training device), equal bit for bit on CPU: decoding shifts small integers out of their bytes and computes
(v - q) x scale in float32, or shifts raw bits, so both libraries do the same exact IEEE operations.

- ``intN`` (N = 2, 3, 4, 6): symmetric uniform quantisation with per channel scales per sample-view. The clipping
  point is the one of a few candidates (multiples of the channel's RMS, and its peak) that gives the least squared
  error: the peak wastes levels on a few outliers (a channel 100x the rest is scaled on its own; an outlier
  position is clipped rather than letting it flatten the whole map). Scales are kept as bfloat16 (their rounding
  is applied before quantising, so decoding is exact). Values of 4 bits or fewer are packed along the map's width:
  two per byte (int4, int3) or four (int2), the last byte of an odd row padded; packed bytes compress better under
  plain zstd than bit-shuffled unpacked ones (measured: docs/store-format.md).
- ``bf16mK``: bfloat16 with the mantissa rounded to K bits (nearest, ties to even, as numcodecs' BitRound does for
  float32): the raw 16 bits keep their trailing zeros, which Blosc's bit-shuffle removes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CLIP_RMS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0)  # candidate clips, x the channel RMS
SEARCH_VALUES = 256  # values per channel on which each candidate clip's error is measured
PEAKS = 8  # largest magnitudes of a channel whose clipping error is counted exactly in the search
ROUNDER = 1.5 * 2**23  # x + ROUNDER - ROUNDER rounds a float32 of magnitude below 2**22 to the nearest integer, ties even


def slots(bits: int) -> int:
    """Values packed per byte for an ``bits``-bit form: 4 (2 bits), 2 (3 and 4 bits), 1 (wider)."""
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


def packed_width(width: int, per_byte: int) -> int:
    return -(-width // per_byte)


# -- encoding (torch) ---------------------------------------------------------------------------------------------
def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> raw bfloat16 bits (int16), nearest even."""
    import torch

    return x.to(torch.bfloat16).view(torch.int16)


def from_bf16_bits(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw bfloat16 bits (int16 or uint16) -> float32 (into ``out`` when given)."""
    import torch

    return b.view(torch.bfloat16).float() if out is None else out.copy_(b.view(torch.bfloat16))


def best_scales(t: torch.Tensor, q: int, search: int = SEARCH_VALUES, width: int | None = None) -> torch.Tensor:
    """Per channel scales (..., C), float32 values of bfloat16, whose quantisation of ``t`` (..., C, H, W) to integers
    in [-q, q] has the least squared error among clips at multiples of the channel's RMS and at its peak. Each clip's
    error is estimated, all clips at once, on up to ``search`` evenly strided values of the channel (scaled to all of
    them; the stride prime to the map's ``width``, default W, so that the sample does not fall on a few columns)
    plus its ``PEAKS`` largest magnitudes exactly: rare outliers (a few positions 100x the rest) decide whether
    clipping pays, and a strided sample would miss them."""
    import torch

    flat = t.flatten(-2)
    n = flat.shape[-1]
    peak = flat.abs().amax(dim=-1)
    rms = flat.square().mean(dim=-1).sqrt()
    step = max(1, n // search)
    while math.gcd(step, width or t.shape[-1]) > 1:
        step += 1
    sub = flat[..., ::step]
    top = flat.gather(-1, flat.abs().topk(min(PEAKS, n), dim=-1).indices)
    m = torch.tensor((0.0, *CLIP_RMS), device=t.device).reshape(-1, *[1] * peak.ndim)  # 0: the peak itself
    clips = torch.where(m > 0, torch.minimum(rms * m, peak), peak)  # (K, ..., C)
    s = from_bf16_bits(bf16_bits(clips / q))
    s = torch.where(s > 0, s, torch.ones_like(s))[..., None]
    err = _clip_error(sub, s, q) * (n / sub.shape[-1]) + _clip_error(top, s, q) * (1 if n > search else 0)
    return s[..., 0].gather(0, err.argmin(dim=0, keepdim=True))[0]


def _clip_error(x: torch.Tensor, s: torch.Tensor, q: int) -> torch.Tensor:
    """Squared error of quantising ``x`` (..., C, m) with each of the scales ``s`` (K, ..., C, 1): (K, ..., C)."""
    v = (x * (1 / s)).clamp_(-q, q)
    v.add_(ROUNDER).sub_(ROUNDER)  # nearest, ties to even (|v| <= q < 2**22): two adds where torch.round is slow on CPU
    return v.mul_(s).sub_(x).square_().sum(dim=-1)


def quantise(t: torch.Tensor, scales: torch.Tensor, q: int) -> torch.Tensor:
    """Integers in [-q, q] (as floats): ``t`` (..., C, H, W) over its scales (..., C), nearest, ties to even."""
    import torch

    return torch.round(t / scales[..., None, None]).clamp_(-q, q)


def pack(u: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Unsigned values (..., W) below 2**(8 // per_byte) -> bytes (..., ceil(W / per_byte)), first value lowest."""
    import torch

    if per_byte == 1:
        return u.to(torch.uint8)
    width = u.shape[-1]
    pad = packed_width(width, per_byte) * per_byte - width
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.to(torch.uint8).reshape(*u.shape[:-1], -1, per_byte)
    bits = 8 // per_byte
    out = u[..., 0].clone()
    for k in range(1, per_byte):
        out |= u[..., k] << (bits * k)
    return out


def int_encode(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float (..., C, H, W) -> stored values (int8, or packed uint8 (..., C, H, ceil(W / per byte))) and bf16 scales."""
    import torch

    q = (1 << (bits - 1)) - 1
    scales = best_scales(t, q)
    v = quantise(t, scales, q)
    per_byte = slots(bits)
    values = v.to(torch.int8) if per_byte == 1 else pack((v + q).to(torch.uint8), per_byte)
    return values, bf16_bits(scales)


def round_mantissa(t: torch.Tensor, keep: int) -> torch.Tensor:
    """float32 -> raw bfloat16 bits (int16) with ``keep`` mantissa bits, nearest, ties to even (numcodecs' BitRound)."""
    import torch

    b = t.float().contiguous().view(torch.int32)
    drop = 23 - keep
    b = (b + ((b >> drop) & 1) + ((1 << (drop - 1)) - 1)) & ~((1 << drop) - 1)
    return (b >> 16).to(torch.int16)  # the low 16 bits are zero: the high half is the whole value


# -- decoding: numpy (readers) and torch (the training device), equal bit for bit ------------------------------------
def int_decode(values: np.ndarray, scales: np.ndarray | None, width: int, bits: int) -> np.ndarray:
    """Stored values (+ bf16 scales (..., C)) -> float32 (..., C, H, width): each value shifted out of its byte straight
    into the float32 output, then (v - q) x scale (both exact steps of IEEE single precision, as in torch)."""
    if scales is None:
        raise ValueError(f"int{bits} features need their scales to be decoded")
    s = bf16_to_float32(scales)[..., None, None]
    per_byte = slots(bits)
    if per_byte == 1:
        return values.astype(np.float32) * s
    u = values.view(np.uint8)
    slot, mask = 8 // per_byte, (1 << (8 // per_byte)) - 1
    out = np.empty((*u.shape[:-1], u.shape[-1] * per_byte), dtype=np.float32)
    for k in range(per_byte):
        out[..., k::per_byte] = (u >> (slot * k)) & mask if k else u & mask
    out -= (1 << (bits - 1)) - 1
    out *= s
    return out if out.shape[-1] == width else np.ascontiguousarray(out[..., :width])


def int_decode_torch(
    values: torch.Tensor, scales: torch.Tensor | None, width: int, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``int_decode`` in torch, on the tensors' device (into ``out`` when given)."""
    import torch

    if scales is None:
        raise ValueError(f"int{bits} features need their scales to be decoded")
    s = from_bf16_bits(scales.view(torch.int16))[..., None, None]
    per_byte = slots(bits)
    if per_byte == 1:
        return torch.mul(values, s, out=out)  # int8 x float32 in float32: values.float() * s
    u = values.view(torch.uint8)
    slot, mask = 8 // per_byte, (1 << (8 // per_byte)) - 1
    parts = torch.stack([(u >> (slot * k)) & mask for k in range(per_byte)], dim=-1).reshape(*u.shape[:-1], -1)[..., :width]
    v = parts.float() if out is None else out.copy_(parts)
    return v.sub_((1 << (bits - 1)) - 1).mul_(s)


def bf16_to_float32(b: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16 or int16) -> float32."""
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
