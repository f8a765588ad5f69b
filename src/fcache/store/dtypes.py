"""Stored feature forms, as one table: fp16 / bf16 / int8 / fp32 and the compact forms (``fcache.store.quant``).

A form is one ``DTYPES`` entry (and its rows in the conformance suite): how float features become stored values
(torch, on any device: the extraction encodes on the GPU, before the copy to the host), how stored values become
float32 again (numpy in readers, and torch, equal bit for bit on CPU, for decoding on the training device), the side
data kept beside them (per-channel scales per sample-view, in ``scales/<level>``), how values are packed along the
map's width, how Blosc shuffles their bytes, and the relative RMSE the form keeps to (its ``verify --recompute``
tolerance). torch is imported when features are encoded, not with this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from fcache.common.errors import Fp16OverflowError, InputError
from fcache.store import project, quant

if TYPE_CHECKING:
    import torch

FP16_MAX = float(np.finfo(np.float16).max)
ERROR_SAMPLE = 1 << 20  # values per item on which the quantisation error is measured exactly
ERROR_BLOCK = 4096  # values whose squares are summed in float32 before the float64 sum of the quantisation error

# float (..., C, H, W), basis -> values, side (..., C); values, side, width, basis -> float32 (..., C, H, width); the torch
# decode also takes a float32 tensor of the result's shape that it may decode into in place (``out``), and returns the result
Encode = Callable[["torch.Tensor", "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]
Decode = Callable[[np.ndarray, "np.ndarray | None", int, "np.ndarray | None"], np.ndarray]
DecodeTorch = Callable[["torch.Tensor", "torch.Tensor | None", int, "torch.Tensor | None", "torch.Tensor | None"], "torch.Tensor"]


@dataclass(frozen=True)
class StoredDtype:
    """One stored form: numpy layout, encoding (torch), decoding (numpy and torch), side data, packing, shuffle."""

    name: str
    numpy: np.dtype  # what the zarr arrays hold
    shuffle: str  # Blosc shuffle: "byte", "bit" or "none"
    tolerance: float  # relative RMSE the form keeps to; verify --recompute allows it between stored and recomputed
    encode: Encode
    decode: Decode
    decode_torch: DecodeTorch
    side: np.dtype | None = None  # per channel side data per sample-view (scales), in scales/<level>
    per_byte: int = 1  # values packed into each stored element along the width
    max_abs: float = math.inf  # finite values beyond this do not fit (fp16)
    ratio: int = 0  # projected forms: ceil(C / ratio) components of a basis fitted per level (basis/<level>)

    @property
    def scaled(self) -> bool:
        return self.side is not None

    @property
    def fitted(self) -> bool:
        """Whether the form needs a basis fitted on the store's first unit (``fit``)."""
        return self.ratio > 0

    @property
    def bitshuffle(self) -> bool:
        return self.shuffle == "bit"

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored values of features shaped ``shape`` (..., C, H, W): the width packed, the channels
        projected."""
        c = project.components(shape[-3], self.ratio) if self.ratio else shape[-3]
        return (*shape[:-3], c, shape[-2], quant.packed_width(shape[-1], self.per_byte))

    def side_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the side data of features shaped ``shape`` (..., C, H, W): (..., C), or one scale per map (..., 1)
        for a projected form."""
        return (*shape[:-3], 1) if self.ratio else tuple(shape[:-2])

    def basis_shape(self, channels: int) -> tuple[int, int] | None:
        """Shape of the basis of a level of ``channels`` (the channel means, then the components), None unfitted."""
        return (project.components(channels, self.ratio) + 1, channels) if self.ratio else None

    def fit(self, maps: np.ndarray) -> np.ndarray | None:
        """The basis of a projected form fitted on float32 ``maps`` (..., C, H, W); None for the others."""
        return project.fit(maps, project.components(maps.shape[-3], self.ratio)) if self.ratio else None


def _fp16(t: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    return t.half(), None


def _bf16(t: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    return quant.bf16_bits(t), None  # round to nearest even; raw bits


def _bf16_rounded(t: torch.Tensor, basis: torch.Tensor | None, keep: int) -> tuple[torch.Tensor, None]:
    return quant.round_mantissa(t, keep), None


def _int_encode(t: torch.Tensor, basis: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant.int_encode(t, bits)


def _int_decode(values: np.ndarray, scales: np.ndarray | None, width: int, basis: np.ndarray | None, bits: int) -> np.ndarray:
    return quant.int_decode(values, scales, width, bits)


def _int_decode_torch(values: torch.Tensor, scales: torch.Tensor | None, width: int, basis: torch.Tensor | None,
                      out: torch.Tensor | None, bits: int) -> torch.Tensor:  # fmt: skip
    return quant.int_decode_torch(values, scales, width, bits, out)


def _int8(t: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    channel_peak = t.abs().amax(dim=(-2, -1))  # (..., C): symmetric, per channel of each sample-view
    scales = torch.where(channel_peak > 0, channel_peak / 127.0, torch.ones_like(channel_peak))
    return torch.round(t / scales[..., None, None]).clamp_(-127, 127).to(torch.int8), scales


def _fp32(t: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    return t, None


def _as_float32(values: np.ndarray, side: np.ndarray | None, width: int, basis: np.ndarray | None) -> np.ndarray:
    return values.astype(np.float32, copy=False)


def _as_float32_torch(values: torch.Tensor, side: torch.Tensor | None, width: int, basis: torch.Tensor | None,
                      out: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    return values.float() if out is None else out.copy_(values)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return quant.bf16_to_float32(b)


def _bf16_decode(values: np.ndarray, side: np.ndarray | None, width: int, basis: np.ndarray | None) -> np.ndarray:
    return quant.bf16_to_float32(values)


def _bf16_decode_torch(values: torch.Tensor, side: torch.Tensor | None, width: int, basis: torch.Tensor | None,
                       out: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    import torch

    return quant.from_bf16_bits(values.view(torch.int16), out)


def _int8_decode(values: np.ndarray, scales: np.ndarray | None, width: int, basis: np.ndarray | None) -> np.ndarray:
    if scales is None:
        raise ValueError("int8 features need their scales to be decoded")
    return values.astype(np.float32) * scales[..., None, None]


def _int8_decode_torch(values: torch.Tensor, scales: torch.Tensor | None, width: int, basis: torch.Tensor | None,
                       out: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    import torch

    if scales is None:
        raise ValueError("int8 features need their scales to be decoded")
    return torch.mul(values, scales.float()[..., None, None], out=out)  # int8 x float32 in float32: values.float() * scales


def _int_form(bits: int, tolerance: float) -> StoredDtype:
    """``int{bits}``: per-channel scales with the least error (bf16 side data), packed along the width below 5 bits."""
    per_byte = quant.slots(bits)
    return StoredDtype(
        f"int{bits}", np.dtype("int8" if per_byte == 1 else "uint8"), "none", tolerance,
        partial(_int_encode, bits=bits), partial(_int_decode, bits=bits), partial(_int_decode_torch, bits=bits),
        side=np.dtype("uint16"), per_byte=per_byte,
    )  # fmt: skip


def _pca_form(ratio: int) -> StoredDtype:
    """``pca{ratio}``: ceil(C / ratio) principal components of the level, fitted on the first unit; int8 coefficients.
    Its error depends on the features (measured per store): the bound is that of the coefficients' rounding alone."""
    return StoredDtype(f"pca{ratio}", np.dtype("int8"), "none", 0.05, partial(project.encode, ratio=ratio),
                       partial(project.decode, ratio=ratio), partial(project.decode_torch, ratio=ratio), side=np.dtype("uint16"),
                       ratio=ratio)  # fmt: skip


def _bf16_form(keep: int, tolerance: float) -> StoredDtype:
    """``bf16m{keep}``: bfloat16 with its mantissa rounded to ``keep`` bits; the zero bit planes vanish under bit-shuffle."""
    return StoredDtype(f"bf16m{keep}", np.dtype("uint16"), "bit", tolerance, partial(_bf16_rounded, keep=keep), _bf16_decode,
                       _bf16_decode_torch)  # fmt: skip


DTYPES: dict[str, StoredDtype] = {
    "fp16": StoredDtype("fp16", np.dtype("float16"), "byte", 2e-3, _fp16, _as_float32, _as_float32_torch, max_abs=FP16_MAX),
    "bf16": StoredDtype("bf16", np.dtype("uint16"), "byte", 1e-2, _bf16, _bf16_decode, _bf16_decode_torch),
    "int8": StoredDtype("int8", np.dtype("int8"), "bit", 2e-2, _int8, _int8_decode, _int8_decode_torch, side=np.dtype("float32")),
    "fp32": StoredDtype("fp32", np.dtype("float32"), "byte", 1e-4, _fp32, _as_float32, _as_float32_torch),
    # compact forms: the bound is the relative RMSE they keep to on normalised and heavy-tailed features (worst measured
    # x ~1.3); a rounded mantissa bounds every value's relative error by 2**-(keep + 1)
    "bf16m3": _bf16_form(3, 0.0625),
    "int6": _int_form(6, 0.05),
    "int4": _int_form(4, 0.2),
    "int3": _int_form(3, 0.35),
    "int2": _int_form(2, 0.6),
    # projected forms: what they keep depends on how correlated the level's channels are (verify --recompute allows
    # 1.5x the error the store measured); one row per ratio of channels kept
    **{f"pca{r}": _pca_form(r) for r in (4, 8, 16, 32)},
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

    values: np.ndarray  # stored form: the input's shape, packed along W or projected along C
    scales: np.ndarray | None  # scaled forms only: the form's side data, shaped as the values without (H, W)
    sq_err: np.ndarray  # (n,) float64: sum of squared reconstruction errors of each item
    sq_ref: np.ndarray  # (n,) float64: sum of squared reference values of each item

    @property
    def rel_rmse(self) -> float:
        """Relative RMSE over all items."""
        ref = float(self.sq_ref.sum())
        return math.sqrt(float(self.sq_err.sum()) / ref) if ref > 0 else 0.0


def encode(x: np.ndarray | torch.Tensor, dtype: str, level: str = "", basis: np.ndarray | torch.Tensor | None = None) -> Encoded:
    """Encode float features (..., C, H, W), a numpy array or a tensor on any device, into the stored form (a projected
    form on its level's ``basis``, ``StoredDtype.fit``).

    The reconstruction error (of what the reader decodes) is measured per item (first axis), exactly on up to
    ``ERROR_SAMPLE`` values in all and on an evenly strided subset of that many beyond (an unbiased estimate).

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
    b = None if basis is None else (torch.from_numpy(np.asarray(basis, dtype=np.float32)) if isinstance(basis, np.ndarray) else basis)
    b = None if b is None else b.to(t.device)
    values, side = d.encode(t, b)
    sq_err, sq_ref = _error(t, d.decode_torch(values, side, t.shape[-1], b, None))
    host = values.cpu().numpy().view(d.numpy)
    side_host = None if side is None or d.side is None else side.cpu().numpy().view(d.side)
    return Encoded(values=host, scales=side_host, sq_err=sq_err, sq_ref=sq_ref)


def _error(t: torch.Tensor, got: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per item (first axis): sums of squared reconstruction error and of squared reference, on the strided subset."""
    n = t.shape[0] if t.ndim > 0 else 1
    step = max(1, t.numel() // ERROR_SAMPLE)
    ref = t.reshape(n, -1)[:, ::step]
    return _square_sums(got.reshape(n, -1)[:, ::step] - ref, step), _square_sums(ref, step)


def _square_sums(x: torch.Tensor, scale: int) -> np.ndarray:
    """``scale`` x the sum of squares of each row of float32 ``x`` (n, m): in float32 over blocks of ``ERROR_BLOCK``
    values, the blocks' sums in float64 (within 1e-6 relative of float64 sums throughout, one pass over the values).
    On CPU each block is one BLAS dot; elsewhere (where matmuls may run in TF32) its squares are summed."""
    import torch

    n, m = x.shape
    whole = m - m % ERROR_BLOCK
    blocks = x[:, :whole].reshape(-1, 1, ERROR_BLOCK)
    if x.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            per_block = torch.bmm(blocks, blocks.transpose(1, 2)).reshape(n, -1)
    else:
        per_block = blocks.square().sum(dim=-1).reshape(n, -1)
    sums = per_block.double().sum(dim=1)
    if whole < m:
        sums += x[:, whole:].square().sum(dim=1).double()
    return (sums * scale).cpu().numpy()


def decode(
    values: np.ndarray, dtype: str, scales: np.ndarray | None = None, width: int | None = None, basis: np.ndarray | None = None
) -> np.ndarray:
    """Stored values (and side data, for a scaled form) back to float32 (..., C, H, W); ``width`` is W, needed for a
    packed form (its stored width is W over the values per byte, rounded up); ``basis`` for a projected form."""
    d = stored(dtype)
    return d.decode(values, scales, _width(d, values.shape[-1], width), basis)


def decode_torch(
    values: torch.Tensor,
    dtype: str,
    scales: torch.Tensor | None = None,
    width: int | None = None,
    basis: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``decode`` in torch, on the tensors' device (equal to ``decode`` bit for bit on CPU). ``out``: a float32 tensor of
    the result's shape on that device, which the forms that convert value by value (all but the packed and projected
    ones) decode into in place (a buffer reused from batch to batch); the result is returned either way."""
    d = stored(dtype)
    return d.decode_torch(values, scales, _width(d, values.shape[-1], width), basis, out)


def _width(d: StoredDtype, stored_width: int, width: int | None) -> int:
    if width is None:
        if d.per_byte > 1:
            raise ValueError(f"decoding {d.name} needs the width of the map (its values are packed)")
        return stored_width
    if quant.packed_width(width, d.per_byte) != stored_width:
        raise ValueError(f"{d.name} values of stored width {stored_width} cannot hold maps of width {width}")
    return width
