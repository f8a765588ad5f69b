"""The projected forms ``pcaR``: each level's channels projected on a basis fitted once per store, decode = one matmul.

Features of a backbone's level are strongly correlated across channels (on the demo's SwinV2-T, 7 of 192 principal
components hold 90% of p3's variance). ``fit`` takes the principal components of the first unit's maps: a (k + 1, C)
float32 array kept in ``basis/<level>``, row 0 the channel means, rows 1..k the top ``k = ceil(C / R)`` directions,
each scaled to whole numbers of at most ``weight_limit(k)``. ``encode`` stores each map's coefficients on those rows
(k, H, W) as int8 with one scale per map (one step for every component: the allocation of least squared error), the
clip chosen for the least error as the int forms do (bf16 side data). ``decode`` is ``mean + scale x (rows^T @
coefficients)``: the matmul multiplies and sums whole numbers below 2**24, which float32 holds exactly in any order,
on any device (TF32 included: its inputs are below 2**11), so numpy and torch decode to the same bits however the
maps are batched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fcache.store import quant

if TYPE_CHECKING:
    import torch

Q = 127  # coefficients: int8
SEARCH_VALUES = 8192  # coefficients of a map on which each candidate clip's error is measured (one scale per map)


def components(channels: int, ratio: int) -> int:
    """Principal components kept of ``channels`` by ``pca{ratio}``."""
    return max(1, math.ceil(channels / ratio))


def weight_limit(k: int) -> int:
    """Largest whole-number weight of a basis of ``k`` rows: k x limit x Q stays below 2**24 (exact float32 sums),
    and the weights below 2**11 (exact TF32 inputs)."""
    return max(1, min(2047, ((1 << 24) - 1) // (Q * k)))


def fit(maps: np.ndarray, k: int) -> np.ndarray:
    """(k + 1, C) float32: the channel means of ``maps`` (..., C, H, W), then the top k principal directions, each
    scaled to whole numbers up to ``weight_limit(k)`` (largest variance first, sign fixed by the largest weight)."""
    c = maps.shape[-3]
    x = np.moveaxis(np.asarray(maps, dtype=np.float32).reshape(-1, c, maps.shape[-2] * maps.shape[-1]), 1, 2).reshape(-1, c)
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.atleast_2d(np.cov(x, rowvar=False, dtype=np.float64)) if len(x) > 1 else np.eye(c)
    values, vectors = np.linalg.eigh(cov)
    top = vectors[:, np.argsort(values)[::-1][:k]].T  # (k, C)
    peak_at = np.abs(top).argmax(axis=1)
    top = top * (weight_limit(k) / top[np.arange(len(top)), peak_at])[:, None]  # the largest weight becomes +limit
    return np.concatenate([mean[None], np.round(top)]).astype(np.float32)


def check_basis(basis: np.ndarray | torch.Tensor | None, k: int) -> None:
    if basis is None:
        raise ValueError("a projected form needs its level's basis (basis/<level> of the store) to encode or decode")
    if basis.shape[0] != k + 1:
        raise ValueError(f"the basis has {basis.shape[0] - 1} components, the form keeps {k}")


def encode(t: torch.Tensor, basis: torch.Tensor | None, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float (..., C, H, W) -> int8 coefficients (..., k, H, W) and one bf16 scale per map (..., 1)."""
    import torch

    k = components(t.shape[-3], ratio)
    check_basis(basis, k)
    assert basis is not None
    b = basis.to(t.device, torch.float32)
    rows = b[1:]
    coef = torch.matmul(rows, (t - b[0][:, None, None]).flatten(-2)) / rows.square().sum(dim=1)[:, None]  # (..., k, HW)
    maps = coef.flatten(-2)[..., None, :, None]  # (..., 1, k * HW, 1): one scale for all of a map's coefficients
    scales = quant.best_scales(maps, Q, search=SEARCH_VALUES, width=t.shape[-1])  # (..., 1)
    values = quant.quantise(maps, scales, Q).reshape(coef.shape).unflatten(-1, t.shape[-2:])
    return values.to(torch.int8), quant.bf16_bits(scales)


def decode_torch(
    values: torch.Tensor, scales: torch.Tensor | None, width: int, basis: torch.Tensor | None, out: torch.Tensor | None, ratio: int
) -> torch.Tensor:
    """int8 coefficients (..., k, H, W) -> float32 (..., C, H, W) on the tensors' device (into ``out`` when given)."""
    import torch

    check_basis(basis, values.shape[-3])
    if scales is None or basis is None:
        raise ValueError("projected features need their scales to be decoded")
    b = (basis if isinstance(basis, torch.Tensor) else torch.from_numpy(basis)).to(values.device, torch.float32)
    flat = None if out is None else out.flatten(-2)  # (..., C, HW), a view of ``out``
    whole = torch.matmul(b[1:].T, values.float().flatten(-2), out=flat)  # sums of whole numbers, exact
    s = quant.from_bf16_bits(scales.view(torch.int16))[..., None]  # (..., 1, 1)
    return whole.mul_(s).add_(b[0][:, None]).unflatten(-1, values.shape[-2:])


def decode(values: np.ndarray, scales: np.ndarray | None, width: int, basis: np.ndarray | None, ratio: int) -> np.ndarray:
    """``decode_torch`` in numpy (the same exact sums, the same float32 multiply and add)."""
    check_basis(basis, values.shape[-3])
    if scales is None or basis is None:
        raise ValueError("projected features need their scales to be decoded")
    b = np.asarray(basis, dtype=np.float32)
    flat = values.reshape(*values.shape[:-2], -1).astype(np.float32)
    whole = np.matmul(b[1:].T, flat)  # (..., C, HW)
    whole *= quant.bf16_to_float32(scales)[..., None]
    whole += b[0][:, None]
    return whole.reshape(*whole.shape[:-1], *values.shape[-2:])
