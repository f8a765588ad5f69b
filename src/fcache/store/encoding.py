"""Feature dtypes and codecs of the store: fp16 / bf16 (raw 16-bit) / int8 (per-channel scales) / fp32.

Encoding is pure numpy so workers need nothing but the arrays; decoding always returns float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

FP16_MAX = float(np.finfo(np.float16).max)

# stored numpy dtype of each feature dtype; bf16 is kept as its raw 16 bits
STORED_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype("float16"),
    "bf16": np.dtype("uint16"),
    "int8": np.dtype("int8"),
    "fp32": np.dtype("float32"),
}


class Fp16OverflowError(ValueError):
    """Features exceed float16's range; the run must switch dtype."""


@dataclass(frozen=True)
class Encoded:
    """One batch of features in stored form, with what its quantisation cost."""

    values: np.ndarray  # stored dtype, same shape as the input
    scales: np.ndarray | None  # int8 only: float32, input shape without (H, W)
    sq_err: float  # sum of squared reconstruction errors
    sq_ref: float  # sum of squared reference values


def check_dtype(dtype: str) -> str:
    if dtype not in STORED_DTYPES:
        raise ValueError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(STORED_DTYPES)}")
    return dtype


def encode(x: np.ndarray, dtype: str, level: str = "") -> Encoded:
    """Encode float32 features (..., C, H, W) into the stored dtype.

    The reconstruction error is measured exactly on arrays up to ``ERROR_SAMPLE`` values and on an
    evenly strided subset of that many values beyond (an unbiased estimate, at a fraction of the cost).

    Raises:
        Fp16OverflowError: a finite value does not fit float16.
        ValueError: the features contain NaN or Inf.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    scales = None
    if dtype == "fp32":
        values = x
    elif dtype == "fp16":
        with np.errstate(over="ignore"):  # overflow is reported below, with advice
            values = x.astype(np.float16)
    elif dtype == "bf16":
        values = float32_to_bf16_bits(x)
    elif dtype == "int8":
        values, scales = quantise_int8(x)
    else:
        check_dtype(dtype)
    _check_finite(x, values if dtype == "fp16" else (scales if scales is not None else values), dtype, level)
    step = max(1, x.size // ERROR_SAMPLE)
    ref = x.reshape(-1)[::step]
    if scales is not None:
        flat_scales = np.broadcast_to(scales[..., None, None], x.shape).reshape(-1)[::step]
        got = values.reshape(-1)[::step].astype(np.float32) * flat_scales
    else:
        got = decode(values.reshape(-1)[::step], dtype)
    sq_err = float(np.square(got - ref, dtype=np.float64).sum()) * step
    sq_ref = float(np.square(ref, dtype=np.float64).sum()) * step
    return Encoded(values=values, scales=scales, sq_err=sq_err, sq_ref=sq_ref)


ERROR_SAMPLE = 1 << 20


def _check_finite(x: np.ndarray, probe: np.ndarray, dtype: str, level: str) -> None:
    """One pass over the (smallest) encoded form; only a failure looks at the input again."""
    if probe.dtype.kind == "f" and np.isfinite(probe).all():
        return
    if probe.dtype.kind != "f" and np.isfinite(x.sum(dtype=np.float64)):
        return
    if not np.isfinite(x).all():
        raise ValueError(f"features of level {level or '?'} contain NaN or Inf; the backbone output is broken")
    if dtype == "fp16":
        peak = float(np.abs(x).max())
        raise Fp16OverflowError(
            f"features of level {level or '?'} reach {peak:.3g}, beyond float16's range ({FP16_MAX:.0f}); "
            "rerun with --dtype bf16 (same size, float32's range) or --dtype fp32"
        )


def decode(values: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored values (and int8 scales) back to float32."""
    if dtype == "bf16":
        return bf16_bits_to_float32(values)
    if dtype == "int8":
        if scales is None:
            raise ValueError("int8 features need their scales to be decoded")
        return values.astype(np.float32) * scales[..., None, None]
    return values.astype(np.float32, copy=False)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw 16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bias = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + bias) >> 16).astype(np.uint16)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantise_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: one float32 scale per (..., C), over each H x W map."""
    peak = np.abs(x).max(axis=(-2, -1))  # (..., C)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scales[..., None, None]), -127, 127).astype(np.int8)
    return q, scales


def parse_codec(spec: str) -> tuple[str, int]:
    """``zstd`` | ``zstd:LEVEL`` | ``lz4`` | ``none`` -> (name, level)."""
    name, _, level = spec.partition(":")
    defaults = {"zstd": 1, "lz4": 5, "none": 0}
    if name not in defaults or (level and name != "zstd"):
        raise ValueError(f"unknown codec {spec!r}; use zstd, zstd:LEVEL (1-9), lz4 or none")
    if not level:
        return name, defaults[name]
    if not level.isdigit() or not 1 <= int(level) <= 9:
        raise ValueError(f"zstd level must be 1..9, got {level!r} in codec {spec!r}")
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
