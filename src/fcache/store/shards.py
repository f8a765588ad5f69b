"""A unit's feature shard as zarr's sharding codec stores it, encoded without zarr's per-chunk machinery.

A feature array holds one shard per unit and one inner chunk per sample-view (``writer._feature_arrays``). The shard
object is each chunk that is not all zero bytes (the fill value) compressed by the array's Blosc
(``codecs.chunk_codecs``) and followed by its CRC32C, the chunks in zarr's morton order, then the index (offset and
length of every chunk of the shard's grid, uint64 little-endian, all ones for a chunk left out) and the index's CRC32C.
Building it here takes half the CPU of zarr's asynchronous pipeline for the same bytes; an array laid out in any
other way is left to zarr.
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np
import zarr

from fcache.store.codecs import blosc_of, chunk_codecs
from fcache.store.dtypes import stored

EMPTY = 2**64 - 1  # offset and length of a chunk the shard does not hold


def sharded_as_features(arr: zarr.Array, codec: str, form: str) -> bool:
    """Whether ``arr`` is laid out as ``writer._feature_arrays`` makes feature arrays, with ``codec`` for ``form``."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    if arr.shards is None or arr.chunks != (1, 1, *arr.shape[2:]) or arr.shards[1:] != arr.shape[1:]:
        return False
    dtype = stored(form).numpy
    want = ShardingCodec(
        chunk_shape=arr.chunks,
        codecs=[BytesCodec(endian=None if dtype.itemsize == 1 else "little"), *chunk_codecs(codec, form)],
        index_codecs=[BytesCodec(), Crc32cCodec()],
        index_location="end",
    )
    return tuple(arr.metadata.codecs) == (want,) and arr.dtype == dtype  # type: ignore[union-attr]


def shard_bytes(values: np.ndarray, shard_rows: int, codec: str, form: str) -> bytes | None:
    """The object of the shard whose first ``len(values)`` rows (of ``shard_rows``) are ``values`` (n, V, ...); None
    when every chunk is all zero bytes (the fill value), which zarr leaves out, as it leaves out a shard of none."""
    from zarr.core.indexing import morton_order_iter

    blosc: Any = blosc_of(codec, form)
    grid = (shard_rows, values.shape[1], *[1] * (values.ndim - 2))
    index = np.full((*grid, 2), EMPTY, dtype="<u8")
    parts, offset = [], 0
    for c in morton_order_iter(grid):
        if c[0] >= len(values):
            continue
        chunk = np.ascontiguousarray(values[c[0], c[1]], dtype=values.dtype.newbyteorder("<"))
        if not chunk.view(np.uint8).any():
            continue
        data = _with_crc(blosc.encode(chunk) if blosc is not None else chunk.tobytes())
        index[c] = (offset, len(data))
        offset += len(data)
        parts.append(data)
    if not parts:
        return None
    parts.append(_with_crc(index.tobytes()))
    return b"".join(parts)


def _with_crc(data: bytes) -> bytes:
    return data + int(google_crc32c.value(data)).to_bytes(4, "little")
