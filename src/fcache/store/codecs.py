"""Codecs of feature chunks: Blosc (zstd, zstd:LEVEL, lz4, or none) with the form's shuffle, then CRC32C always."""

from __future__ import annotations

from typing import Any

import numpy as np

from fcache.common.errors import InputError
from fcache.store.dtypes import stored

CODEC_DEFAULT_LEVELS = {"zstd": 1, "lz4": 5, "none": 0}


def parse_codec(spec: str) -> tuple[str, int]:
    """``zstd`` | ``zstd:LEVEL`` | ``lz4`` | ``none`` -> (name, level)."""
    name, _, level = spec.partition(":")
    if name not in CODEC_DEFAULT_LEVELS or (level and name != "zstd"):
        raise InputError(f"unknown codec {spec!r}; use zstd, zstd:LEVEL (1-9), lz4 or none")
    if not level:
        return name, CODEC_DEFAULT_LEVELS[name]
    if not level.isdigit() or not 1 <= int(level) <= 9:
        raise InputError(f"zstd level must be 1..9, got {level!r} in codec {spec!r}")
    return name, int(level)


def chunk_codecs(spec: str, dtype: str) -> list[Any]:
    """Compressor chain (zarr BytesBytesCodecs) for feature chunks: Blosc (byte- or bit-shuffle) then CRC32C."""
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

    name, level = parse_codec(spec)
    crc: list[Any] = [Crc32cCodec()]
    if name == "none":
        return crc
    d = stored(dtype)
    shuffle = {"bit": BloscShuffle.bitshuffle, "byte": BloscShuffle.shuffle, "none": BloscShuffle.noshuffle}[d.shuffle]
    return [BloscCodec(cname=name, clevel=level, shuffle=shuffle, typesize=d.numpy.itemsize), *crc]  # type: ignore[arg-type]


CHUNK_OVERHEAD = 4 + 16  # bytes per stored chunk beside its data: its CRC32C and its entry in the shard index


def blosc_of(spec: str, dtype: str) -> Any:
    """The numcodecs Blosc that compresses chunks of ``dtype`` as ``chunk_codecs(spec, dtype)`` does; None for ``none``."""
    from numcodecs import Blosc

    name, level = parse_codec(spec)
    if name == "none":
        return None
    shuffle = {"bit": Blosc.BITSHUFFLE, "byte": Blosc.SHUFFLE, "none": Blosc.NOSHUFFLE}[stored(dtype).shuffle]
    return Blosc(cname=name, clevel=level, shuffle=shuffle)


def side_bytes(side: np.ndarray) -> int:
    """Bytes of side data (scales) in a store: zarr's default codec for them (zstd), one chunk per unit."""
    from numcodecs import Zstd

    return len(Zstd(level=0).encode(np.ascontiguousarray(side)))
