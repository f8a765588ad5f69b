"""Reading feature chunks directly: shard indexes kept, chunks read by byte range, decoded here, many at once.

zarr reads a chunk of a sharded array with two dependent reads (the shard's index, then the chunk), keeps no index,
and spends about 1.5 ms of Python per call; in object storage each read is a round trip of 10-100 ms. Here a
shard's index (16 bytes per chunk + CRC32C, at the end of the shard object) is read once and kept, and a whole batch
of sample-views is read with every range request at once (on local disk: one ``pread`` per chunk, one open file per
shard): the first batch that touches a shard costs two round trips, later ones one. Chunks are decoded here (bytes,
Blosc, CRC32C as ``fcache.store.codecs`` writes them), on a pool of threads, and checked by their CRC32C, so a
corrupt chunk raises ``CorruptStoreError`` instead of returning wrong values. With a ``DiskCache`` (object storage)
the indexes and chunks read are kept on local disk too. Arrays not laid out as fcache writes features fall back to
zarr's own path (``FeatureStore.read``).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from fcache.common.errors import CorruptStoreError
from fcache.spec import Manifest
from fcache.store import layout
from fcache.store.backends import Backend, Range
from fcache.store.cache import DiskCache
from fcache.store.dtypes import decode, stored
from fcache.store.records import LedgerRecord

EMPTY = np.uint64(2**64 - 1)
Chunk = tuple[str, int, int]  # (level, unit, chunk within the unit's shard)
Convert = Callable[[Chunk, np.ndarray], np.ndarray]
T = TypeVar("T")
INDEXES_KEPT = 4096  # shard indexes held in memory (each 16 bytes per chunk)


@dataclass(frozen=True)
class Chunked:
    """How one sharded feature array is laid out: chunk shape and codecs, chunks per shard."""

    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    grid: tuple[int, ...]  # chunks per shard along each axis
    codecs: tuple[dict[str, Any], ...]

    @property
    def chunks_per_shard(self) -> int:
        return math.prod(self.grid)

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], dtype: np.dtype) -> Chunked | None:
        """The layout of an array's ``zarr.json``; None when it is not sharded the way fcache writes features."""
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner = tuple(conf["codecs"])
        if conf.get("index_location", "end") != "end" or [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"]:
            return None
        if inner[0]["name"] != "bytes" or any(c["name"] not in ("blosc", "crc32c") for c in inner[1:]):
            return None
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        chunk = tuple(conf["chunk_shape"])
        return cls(np.dtype(dtype).newbyteorder("<"), chunk, tuple(s // c for s, c in zip(shard, chunk, strict=True)), inner[1:])


class ShardFetcher:
    """Feature values (each level's stored form) of (level, sample, view) requests; safe to use from many threads."""

    def __init__(self, backend: Backend, manifest: Manifest, ledger: dict[int, LedgerRecord], cache: DiskCache | None) -> None:
        self.backend, self.manifest, self.ledger, self.cache = backend, manifest, ledger, cache
        self.numpy = {lv.name: stored(manifest.storage.form(lv.name)).numpy for lv in manifest.levels}
        keys = [f"{layout.FEATURES}/{lv.name}/{layout.ROOT_META}" for lv in manifest.levels]
        self.layouts: dict[str, Chunked | None] = {}
        for lv, raw in zip(manifest.levels, backend.get_many(keys), strict=True):
            self.layouts[lv.name] = Chunked.from_metadata(json.loads(raw), self.numpy[lv.name]) if raw else None
        self._indexes: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def supports(self, level: str) -> bool:
        return self.layouts.get(level) is not None

    def read(
        self, requests: Sequence[tuple[str, int, int | None]], convert: Convert | None = None, out: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Stored values of each (level, sample, view): (C, H, W), or with view None all views (V, C, H, W) (video: T first).

        ``convert(chunk, values)`` is applied to each chunk by the thread that decoded it, while it is in cache (e.g. to
        float32); ``chunk`` is (level, unit, index of the sample-view in the unit's shard). ``out``: an array per request,
        C-contiguous, of its values' shape and the stored dtype's item size, which its chunks are decompressed straight
        into (and which is returned), instead of fresh arrays."""
        self.load_indexes(requests)
        wanted: list[tuple[str, int, int]] = []  # (level, unit, chunk within the shard)
        into: list[np.ndarray] = []  # with ``out``: each wanted chunk's destination
        plan: list[list[int]] = []
        for r, (lv, i, view) in enumerate(requests):
            mine = self.chunks_of((lv, i, view))
            plan.append([len(wanted) + k for k in range(len(mine))])
            wanted += mine
            if out is not None:
                into += [out[r]] if view is not None else list(out[r])
        chunks = self._chunks(wanted, convert, into if out is not None else None)
        if out is not None:
            return list(out)
        got = []
        for (_, _, view), idx in zip(requests, plan, strict=True):
            values = [chunks[k] for k in idx]
            got.append(values[0] if view is not None else np.stack(values))
        return got

    def chunks_of(self, request: tuple[str, int, int | None]) -> list[Chunk]:
        """The chunks holding one (level, sample, view) request: one, or with view None each view's."""
        lv, i, view = request
        unit = self._unit(i)
        views = range(self.manifest.num_views) if view is None else [view]
        return [(lv, unit.index, (i - unit.start) * self.manifest.num_views + v) for v in views]

    def load_indexes(self, requests: Sequence[tuple[str, int, int | None]]) -> None:
        """The shard indexes of these requests' chunks, read (all at once) where not kept yet."""
        self._load_indexes(sorted({(lv, self._unit(i).index) for lv, i, _ in requests}))

    # -- the disk cache, one chunk at a time (fcache.store.readahead) ----------------------------------------
    def cache_get(self, w: Chunk) -> bytes | None:
        return self.cache.get(self._cache_name(w[0], w[1]), f"c{w[2]}") if self.cache is not None else None

    def cache_put(self, w: Chunk, raw: bytes) -> None:
        if self.cache is not None:
            self.cache.put(self._cache_name(w[0], w[1]), f"c{w[2]}", raw)

    def decode_cached(self, w: Chunk, raw: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """``decode`` of chunk ``w`` as the disk cache held it; a damaged cache entry is dropped and read from the store."""
        try:
            return self.decode(w, raw, out)
        except CorruptStoreError:
            assert self.cache is not None
            self.cache.drop(self._cache_name(w[0], w[1]), f"c{w[2]}")
            return self.decode(w, self.fetch([w])[w], out)

    # -- indexes ------------------------------------------------------------------------------------
    def _load_indexes(self, shards: Sequence[tuple[str, int]]) -> None:
        with self._lock:
            missing = [s for s in shards if s not in self._indexes]
            for s in shards:
                if s in self._indexes:
                    self._indexes.move_to_end(s)
        cached = {s: self.cache.get(self._cache_name(*s), "index") if self.cache else None for s in missing}
        fetch = [s for s in missing if cached[s] is None]
        got = self.backend.get_ranges([Range(self._key(lv, u), -self._layout(lv).index_bytes, None) for lv, u in fetch])
        fetched = dict(zip(fetch, got, strict=True))
        for s in missing:
            raw = cached[s] if cached[s] is not None else fetched[s]
            assert raw is not None
            try:
                index = self._parse_index(s, raw)
            except CorruptStoreError:
                if cached[s] is None or self.cache is None:
                    raise
                self.cache.drop(self._cache_name(*s), "index")  # a damaged cache entry: read it from the store
                raw = self.backend.get_ranges([Range(self._key(*s), -self._layout(s[0]).index_bytes, None)])[0]
                index = self._parse_index(s, raw)
                fetched[s] = raw
            if s in fetched and self.cache is not None:
                self.cache.put(self._cache_name(*s), "index", raw)
            with self._lock:
                self._indexes[s] = index
                while len(self._indexes) > INDEXES_KEPT:
                    self._indexes.popitem(last=False)

    def _parse_index(self, shard: tuple[str, int], raw: bytes) -> np.ndarray:
        lv, u = shard
        if len(raw) != self._layout(lv).index_bytes or not _crc_ok(raw):
            raise CorruptStoreError(self._damaged(lv, u, "its shard index fails its CRC32C"))
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)

    # -- chunks -------------------------------------------------------------------------------------
    def _chunks(
        self, wanted: Sequence[Chunk], convert: Convert | None = None, into: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        done = convert or (lambda w, v: v)
        dest = (lambda k: into[k]) if into is not None else (lambda k: None)
        if not self.backend.remote and self.cache is None:  # local disk: each decoding thread reads its own chunk
            ranges = {w: self.range_of(w) for w in dict.fromkeys(wanted)}

            def read_one(k: int) -> np.ndarray:
                w = wanted[k]
                return done(w, self.decode(w, self.backend.get_ranges([ranges[w]])[0], dest(k)))

            return largest_first(read_one, [(ranges[w].stop or 0) - ranges[w].start for w in wanted])
        hits = {w: self.cache_get(w) for w in set(wanted)}
        raws = {w: raw for w, raw in hits.items() if raw is not None}
        from_cache = set(raws)
        raws |= self.fetch([w for w in dict.fromkeys(wanted) if w not in raws])

        def decoded(k: int) -> np.ndarray:
            w = wanted[k]
            return done(w, (self.decode_cached if w in from_cache else self.decode)(w, raws[w], dest(k)))

        return list(decoder().map(decoded, range(len(wanted))))

    def range_of(self, w: tuple[str, int, int]) -> Range:
        lv, u, k = w
        with self._lock:
            offset, nbytes = self._indexes[(lv, u)][k]
        if offset == EMPTY:
            raise CorruptStoreError(self._damaged(lv, u, f"chunk {k} is absent from its shard"))
        return Range(self._key(lv, u), int(offset), int(offset + nbytes))

    def fetch(self, wanted: Sequence[tuple[str, int, int]]) -> dict[tuple[str, int, int], bytes]:
        got = dict(zip(wanted, self.backend.get_ranges([self.range_of(w) for w in wanted]), strict=True))
        for w, data in got.items():
            self.cache_put(w, data)
        return got

    def decode(self, w: tuple[str, int, int], raw: bytes, out: np.ndarray | None = None) -> np.ndarray:
        lv, u, _ = w
        chunked = self._layout(lv)
        if out is None:
            values = np.empty(chunked.chunk_shape[2:], dtype=chunked.dtype)  # decoded straight into a fresh, writable array
        else:
            assert out.flags.c_contiguous and out.shape == tuple(chunked.chunk_shape[2:]) and out.itemsize == chunked.dtype.itemsize
            values = out
        data: Any = raw
        for codec in reversed(chunked.codecs):
            if codec["name"] == "crc32c":
                if not _crc_ok(data):
                    raise CorruptStoreError(self._damaged(lv, u, "a chunk fails its CRC32C"))
                data = memoryview(data)[:-4]
            else:  # blosc
                from numcodecs import blosc

                try:
                    _blosc_into(blosc, data, values)
                except (RuntimeError, ValueError) as e:
                    raise CorruptStoreError(self._damaged(lv, u, f"a chunk does not decompress ({e})")) from None
                data = None
        if data is not None:  # stored without compression
            if len(data) != values.nbytes:
                raise CorruptStoreError(self._damaged(lv, u, "a chunk has the wrong size"))
            values.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        return values if out is not None else values.astype(self.numpy[lv], copy=False)

    # -- names --------------------------------------------------------------------------------------
    def _unit(self, i: int) -> layout.Unit:
        return layout.unit_of(i, self.manifest.storage.shard_size, self.manifest.dataset.n)

    def _layout(self, level: str) -> Chunked:
        chunked = self.layouts[level]
        assert chunked is not None, "callers check supports(level)"
        return chunked

    def _key(self, level: str, unit: int) -> str:
        return layout.shard_key(f"{layout.FEATURES}/{level}", unit, 2 + len(self.manifest.level_shape(level)))

    def _cache_name(self, level: str, unit: int) -> str:
        entry = self.ledger[unit].files.get(self._key(level, unit))
        return f"{level}-{unit:06d}-{entry.sha256[:16] if entry else 'unrecorded'}"

    def _damaged(self, level: str, unit: int, what: str) -> str:
        u = self._unit(unit * self.manifest.storage.shard_size)
        return (
            f"{self.backend.url}: level {level}, shard {unit} (samples {u.start}-{u.stop - 1}) is corrupt: {what}; "
            f"run `fcache verify {self.backend.url}` and re-extract that unit"
        )


def to_float32(manifest: Manifest, bases: Mapping[str, np.ndarray], scales: Mapping[tuple[str, int], np.ndarray]) -> Convert:
    """A chunk's stored values to float32 features (``scales``: each scaled level's side data by (level, unit), (samples,
    V, ..., C), filled before its chunks decode)."""
    names = [lv.name for lv in manifest.levels]
    forms = {lv: manifest.storage.form(lv) for lv in names}
    widths, views = {lv: manifest.level_shape(lv)[-1] for lv in names}, manifest.num_views

    def convert(chunk: Chunk, values: np.ndarray) -> np.ndarray:
        lv, u, k = chunk
        side = scales[(lv, u)][k // views, k % views] if (lv, u) in scales else None
        return decode(values, forms[lv], side, widths[lv], bases.get(lv))

    return convert


_POOL: tuple[int, ThreadPoolExecutor] | None = None
THREADS = max(1, min(8, os.cpu_count() or 1))  # decoding threads of a process


def largest_first(work: Callable[[int], T], sizes: Sequence[int]) -> list[T]:
    """``[work(k) for k in range(len(sizes))]`` on the decoding threads, the largest first, each thread taking the next
    when it is done: the last to finish are small, so one thread seldom waits long on the other's last chunk, and a batch
    costs one pool task per thread instead of one per chunk."""
    todo = iter(sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True))
    out: list[Any] = [None] * len(sizes)
    lock, failed = threading.Lock(), threading.Event()

    def drain() -> None:
        while not failed.is_set():
            with lock:
                k = next(todo, None)
            if k is None:
                return
            try:
                out[k] = work(k)
            except BaseException:
                failed.set()
                raise

    for f in [decoder().submit(drain) for _ in range(min(THREADS, len(sizes)))]:
        f.result()
    return out


def decoder() -> ThreadPoolExecutor:
    """Threads decoding chunks (Blosc and numpy release the GIL): one per core, made again in a forked child.

    The pool is the parallelism: numpy's BLAS (a projected form's matmul) is kept to one thread in a process that
    decodes, as its own threads inside each decoding thread would only contend (measured: 0.33 ms per demo p2 map on
    one thread, 5 to 50 ms with OpenBLAS's threads on a busy 2-core machine)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _one_blas_thread()
        _POOL = (os.getpid(), ThreadPoolExecutor(THREADS, thread_name_prefix="fcache-decode"))
    return _POOL[1]


def _one_blas_thread() -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it, numpy's BLAS keeps its threads: slower projected decoding, same values
        return
    threadpool_limits(limits=1, user_api="blas")


def _blosc_into(blosc: Any, data: Any, out: np.ndarray) -> None:
    """Decompress a Blosc frame straight into ``out``, which it must fill exactly (no intermediate copy)."""
    sizes = getattr(blosc, "cbuffer_sizes", None) or getattr(blosc, "_cbuffer_sizes", None)
    if sizes is None:  # a numcodecs without the header reader: decompress, then copy
        raw = blosc.decompress(data)
        if len(raw) != out.nbytes:
            raise ValueError(f"{len(raw)} bytes, the chunk holds {out.nbytes}")
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        return
    if sizes(data)[0] != out.nbytes:
        raise ValueError(f"its header gives {sizes(data)[0]} bytes, the chunk holds {out.nbytes}")
    blosc.decompress(data, out)


def _crc_ok(data: bytes) -> bool:
    """Whether ``data``'s last 4 bytes are the CRC32C of the rest (summed over a view: a chunk's bytes are not copied)."""
    import google_crc32c

    return len(data) >= 4 and google_crc32c.value(np.frombuffer(data, np.uint8)[:-4]) == int.from_bytes(data[-4:], "little")
