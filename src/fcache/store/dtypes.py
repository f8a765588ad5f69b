"""Stored feature dtypes, as one table: fp16 / bf16 (raw 16 bits) / int8 (per-channel scales) / fp32.

Adding a dtype is one ``DTYPES`` entry (and its rows in the conformance suite): how float features become stored
values (on any torch device: the extraction encodes on the GPU, before the copy to the host), how stored values
become float32 again (numpy, in readers), whether per-channel scales are stored beside them, how Blosc shuffles
their bytes and how far a recomputed sample may differ (``verify --recompute``). torch is imported when features
are encoded, not with this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fcache.common.errors import Fp16OverflowError, InputError

if TYPE_CHECKING:
    import torch

FP16_MAX = float(np.finfo(np.float16).max)
ERROR_SAMPLE = 1 << 20  # values per item on which the quantisation error is measured exactly


@dataclass(frozen=True)
class StoredDtype:
    """One stored dtype: numpy layout, encoding (torch) and decoding (numpy)."""

    name: str
    numpy: np.dtype  # what the zarr arrays hold
    scaled: bool  # per-channel scales per sample-view are stored in scales/<level>
    bitshuffle: bool  # Blosc bit-shuffle (int8) rather than byte-shuffle
    tolerance: float  # relative RMSE allowed between stored and recomputed features (same device type)
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # float (..., C, H, W) -> values, scales (..., C)
    exact: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # stored values (x scales of the same shape) as float64
    decode: Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # stored values (+ scales) -> float32
    max_abs: float = math.inf  # finite values beyond this do not fit (fp16)


def _fp16(t: torch.Tensor) -> tuple[torch.Tensor, None]:
    return t.half(), None


def _bf16(t: torch.Tensor) -> tuple[torch.Tensor, None]:
    import torch

    return t.to(torch.bfloat16).view(torch.int16), None  # round to nearest even; raw bits


def _int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    channel_peak = t.abs().amax(dim=(-2, -1))  # (..., C): symmetric, per channel of each sample-view
    scales = torch.where(channel_peak > 0, channel_peak / 127.0, torch.ones_like(channel_peak))
    return torch.round(t / scales[..., None, None]).clamp_(-127, 127).to(torch.int8), scales


def _fp32(t: torch.Tensor) -> tuple[torch.Tensor, None]:
    return t, None


def _float(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    return values.double()


def _bf16_exact(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    import torch

    return values.view(torch.bfloat16).double()


def _int8_exact(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    assert scales is not None
    return values.double() * scales.double()


def _as_float32(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    return values.astype(np.float32, copy=False)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bf16_decode(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    return bf16_bits_to_float32(values)


def _int8_decode(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    if scales is None:
        raise ValueError("int8 features need their scales to be decoded")
    return values.astype(np.float32) * scales[..., None, None]


DTYPES: dict[str, StoredDtype] = {
    "fp16": StoredDtype("fp16", np.dtype("float16"), False, False, 2e-3, _fp16, _float, _as_float32, max_abs=FP16_MAX),
    "bf16": StoredDtype("bf16", np.dtype("uint16"), False, False, 1e-2, _bf16, _bf16_exact, _bf16_decode),
    "int8": StoredDtype("int8", np.dtype("int8"), True, True, 2e-2, _int8, _int8_exact, _int8_decode),
    "fp32": StoredDtype("fp32", np.dtype("float32"), False, False, 1e-4, _fp32, _float, _as_float32),
}


def stored(dtype: str) -> StoredDtype:
    """The table entry of ``dtype``; InputError naming the choices for an unknown one."""
    if dtype not in DTYPES:
        raise InputError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_dtype(dtype: str) -> str:
    stored(dtype)
    return dtype


@dataclass(frozen=True)
class Encoded:
    """Features in stored form, with what their quantisation cost, per item along the first axis."""

    values: np.ndarray  # stored dtype, same shape as the input
    scales: np.ndarray | None  # scaled dtypes only: float32, input shape without (H, W)
    sq_err: np.ndarray  # (n,) float64: sum of squared reconstruction errors of each item
    sq_ref: np.ndarray  # (n,) float64: sum of squared reference values of each item

    @property
    def rel_rmse(self) -> float:
        """Relative RMSE over all items."""
        ref = float(self.sq_ref.sum())
        return math.sqrt(float(self.sq_err.sum()) / ref) if ref > 0 else 0.0


def encode(x: np.ndarray | torch.Tensor, dtype: str, level: str = "") -> Encoded:
    """Encode float features (..., C, H, W), a numpy array or a tensor on any device, into the stored dtype.

    The reconstruction error is measured per item (first axis), exactly on up to ``ERROR_SAMPLE`` values
    in all and on an evenly strided subset of that many beyond (an unbiased estimate, at a fraction of the cost).

    Raises:
        Fp16OverflowError: a finite value does not fit the dtype (fp16).
        InputError: the features contain NaN or Inf.
    """
    import torch

    d = stored(dtype)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float().contiguous()
    lo, hi = (float(v) for v in torch.aminmax(t))  # one pass; NaN and Inf propagate
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"features of level {level or '?'} contain NaN or Inf; the backbone output is broken")
    peak = max(-lo, hi)
    if peak > d.max_abs:
        raise Fp16OverflowError(
            f"features of level {level or '?'} reach {peak:.3g}, beyond {dtype}'s range ({d.max_abs:.0f}); "
            "rerun with --dtype bf16 (same size, float32's range) or --dtype fp32"
        )
    values, scales = d.encode(t)
    sq_err, sq_ref = _error(t, values, scales, d)
    host = values.cpu().numpy().view(d.numpy)
    return Encoded(values=host, scales=None if scales is None else scales.cpu().numpy(), sq_err=sq_err, sq_ref=sq_ref)


def _error(t: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None, d: StoredDtype) -> tuple[np.ndarray, np.ndarray]:
    """Per item (first axis): sums of squared reconstruction error and of squared reference, on the strided subset."""
    n = t.shape[0] if t.ndim > 0 else 1
    step = max(1, t.numel() // ERROR_SAMPLE)
    ref = t.reshape(n, -1)[:, ::step].double()
    sub_scales = None if scales is None else scales[..., None, None].expand_as(t).reshape(n, -1)[:, ::step]
    got = d.exact(values.reshape(n, -1)[:, ::step], sub_scales)
    err = (got - ref).square().sum(dim=1) * step
    return err.cpu().numpy(), (ref.square().sum(dim=1) * step).cpu().numpy()


def decode(values: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored values (and scales, for a scaled dtype) back to float32."""
    return stored(dtype).decode(values, scales)
