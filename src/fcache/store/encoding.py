"""Feature dtypes and codecs of the store: fp16 / bf16 (raw 16-bit) / int8 (per-channel scales) / fp32.

Encoding runs on torch tensors wherever the features are (the extraction encodes on the GPU, before
the copy to the host: half the bytes to move, no CPU time) and returns numpy arrays; decoding is
numpy and always returns float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from fcache.common.errors import Fp16OverflowError, InputError

FP16_MAX = float(np.finfo(np.float16).max)

# stored numpy dtype of each feature dtype; bf16 is kept as its raw 16 bits
STORED_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype("float16"),
    "bf16": np.dtype("uint16"),
    "int8": np.dtype("int8"),
    "fp32": np.dtype("float32"),
}


@dataclass(frozen=True)
class Encoded:
    """Features in stored form, with what their quantisation cost, per item along the first axis."""

    values: np.ndarray  # stored dtype, same shape as the input
    scales: np.ndarray | None  # int8 only: float32, input shape without (H, W)
    sq_err: np.ndarray  # (n,) float64: sum of squared reconstruction errors of each item
    sq_ref: np.ndarray  # (n,) float64: sum of squared reference values of each item

    @property
    def rel_rmse(self) -> float:
        """Relative RMSE over all items."""
        ref = float(self.sq_ref.sum())
        return math.sqrt(float(self.sq_err.sum()) / ref) if ref > 0 else 0.0


def check_dtype(dtype: str) -> str:
    if dtype not in STORED_DTYPES:
        raise InputError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(STORED_DTYPES)}")
    return dtype


def encode(x: np.ndarray | torch.Tensor, dtype: str, level: str = "") -> Encoded:
    """Encode float features (..., C, H, W), a numpy array or a tensor on any device, into the stored dtype.

    The reconstruction error is measured per item (first axis), exactly on up to ``ERROR_SAMPLE`` values
    in all and on an evenly strided subset of that many beyond (an unbiased estimate, at a fraction of the cost).

    Raises:
        Fp16OverflowError: a finite value does not fit float16.
        ValueError: the features contain NaN or Inf.
    """
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float().contiguous()
    lo, hi = (float(v) for v in torch.aminmax(t))  # one pass; NaN and Inf propagate
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"features of level {level or '?'} contain NaN or Inf; the backbone output is broken")
    peak = max(-lo, hi)
    if dtype == "fp16" and peak > FP16_MAX:
        raise Fp16OverflowError(
            f"features of level {level or '?'} reach {peak:.3g}, beyond float16's range ({FP16_MAX:.0f}); "
            "rerun with --dtype bf16 (same size, float32's range) or --dtype fp32"
        )
    scales = None
    if dtype == "fp32":
        values = t
    elif dtype == "fp16":
        values = t.half()
    elif dtype == "bf16":
        values = t.to(torch.bfloat16).view(torch.int16)  # round to nearest even; raw bits
    elif dtype == "int8":
        channel_peak = t.abs().amax(dim=(-2, -1))  # (..., C): symmetric, per channel of each sample-view
        scales = torch.where(channel_peak > 0, channel_peak / 127.0, torch.ones_like(channel_peak))
        values = torch.round(t / scales[..., None, None]).clamp_(-127, 127).to(torch.int8)
    else:
        check_dtype(dtype)
    host = values.cpu().numpy()
    if dtype == "bf16":
        host = host.view(np.uint16)
    host_scales = None if scales is None else scales.cpu().numpy()
    sq_err, sq_ref = _error(t, values, scales, dtype)
    return Encoded(values=host, scales=host_scales, sq_err=sq_err, sq_ref=sq_ref)


ERROR_SAMPLE = 1 << 20


def _error(t: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Per item (first axis): sums of squared reconstruction error and of squared reference, on the strided subset."""
    n = t.shape[0] if t.ndim > 0 else 1
    step = max(1, t.numel() // ERROR_SAMPLE)
    ref = t.reshape(n, -1)[:, ::step].double()
    if dtype == "int8":
        assert scales is not None
        flat_scales = scales[..., None, None].expand_as(t).reshape(n, -1)[:, ::step]
        got = values.reshape(n, -1)[:, ::step].double() * flat_scales.double()
    elif dtype == "bf16":
        got = values.reshape(n, -1)[:, ::step].view(torch.bfloat16).double()
    else:
        got = values.reshape(n, -1)[:, ::step].double()
    err = (got - ref).square().sum(dim=1) * step
    return err.cpu().numpy(), (ref.square().sum(dim=1) * step).cpu().numpy()


def decode(values: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored values (and int8 scales) back to float32."""
    if dtype == "bf16":
        return bf16_bits_to_float32(values)
    if dtype == "int8":
        if scales is None:
            raise ValueError("int8 features need their scales to be decoded")
        return values.astype(np.float32) * scales[..., None, None]
    return values.astype(np.float32, copy=False)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def parse_codec(spec: str) -> tuple[str, int]:
    """``zstd`` | ``zstd:LEVEL`` | ``lz4`` | ``none`` -> (name, level)."""
    name, _, level = spec.partition(":")
    defaults = {"zstd": 1, "lz4": 5, "none": 0}
    if name not in defaults or (level and name != "zstd"):
        raise InputError(f"unknown codec {spec!r}; use zstd, zstd:LEVEL (1-9), lz4 or none")
    if not level:
        return name, defaults[name]
    if not level.isdigit() or not 1 <= int(level) <= 9:
        raise InputError(f"zstd level must be 1..9, got {level!r} in codec {spec!r}")
    return name, int(level)


def chunk_codecs(spec: str, dtype: str) -> list[BytesBytesCodec]:
    """Compressor chain for feature chunks: Blosc (byte- or bit-shuffle) then CRC32C."""
    name, level = parse_codec(spec)
    crc: list[BytesBytesCodec] = [Crc32cCodec()]
    if name == "none":
        return crc
    shuffle = BloscShuffle.bitshuffle if dtype == "int8" else BloscShuffle.shuffle
    typesize = STORED_DTYPES[check_dtype(dtype)].itemsize
    blosc = BloscCodec(cname=name, clevel=level, shuffle=shuffle, typesize=typesize)  # type: ignore[arg-type]
    return [blosc, *crc]
