"""Reading a store: level specs, geometry, targets, features (float32 NCHW, or the stored values a training device decodes:
``fcache.store.transit``), dask arrays; its torch Dataset is ``fcache.store.dataset``.

Only committed units are visible: statuses of uncommitted units read as pending, and a shard whose
file is missing or has another size than its ledger record raises instead of returning fill values.
A store in object storage reads its features through ``fcache.store.fetch`` (shard indexes kept, one range
request per sample-view, a batch's requests all in flight at once, an optional local disk cache).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from fcache.common.errors import CorruptStoreError, InputError, StoreError
from fcache.common.files import check_writable
from fcache.spec import Geometry, LevelSpec, Status
from fcache.store import layout
from fcache.store.backends import Backend, open_backend, parse_size
from fcache.store.cache import DiskCache
from fcache.store.consistency import check_consistent
from fcache.store.dtypes import decode, stored
from fcache.store.fetch import Convert, ShardFetcher, to_float32
from fcache.store.readahead import READ_AHEAD, Expected, ReadAhead, blocks

if TYPE_CHECKING:  # these import torch: imported where features are read, so reading a store's metadata (fcache info) does not
    from fcache.store.dataset import FeatureDataset
    from fcache.store.transit import LevelCode, Stored
    from fcache.store.webdataset import WdsExport

GEOMETRY_UNITS_KEPT = 64  # units of geometry a reader keeps (a few KB each)
READ_PATHS = ("direct", "zarr")  # fcache.store.fetch's (kept shard indexes, byte ranges), or zarr's own (to compare the two)


def open_store(
    path: str | Path | Backend,
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    cache_size: int | str | None = None,
    read_path: str = "direct",
) -> FeatureStore | WdsExport:
    """Open a store for reading (the public ``fcache.store.open``): a local path, ``s3://...`` or ``gs://...``; or a
    webdataset export of one (``fcache export-wds``), which is read as a stream (``WdsExport.stream()``).

    Args:
        storage_options: passed to s3fs / gcsfs as they are (endpoint, profile, ...), for a URL.
        cache_dir, cache_size: a local disk cache of a remote store's shards, at most ``cache_size`` bytes (e.g. "200GB").
        read_path: how features are read (``READ_PATHS``): ``direct`` (``fcache.store.fetch``) or zarr's own path.
    """
    backend = open_backend(path, storage_options)
    if layout.read_manifest_attrs(backend) is None and _is_export(backend):
        from fcache.store.webdataset import WdsExport

        return WdsExport(backend)
    return FeatureStore(backend, cache_dir=cache_dir, cache_size=cache_size, read_path=read_path)


class FeatureStore:
    """Read access to a feature store. Picklable; zarr handles are reopened in each process."""

    def __init__(
        self,
        path: str | Path | Backend,
        *,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        cache_size: int | str | None = None,
        check: bool = True,
        read_path: str = "direct",
    ) -> None:
        """Open the store at ``path``; ``check=False`` skips the manifest-against-arrays check (``fcache verify``
        reports those problems itself; a store from a pickle was checked where it was opened). ``read_path``: one of
        ``READ_PATHS`` (``fetcher``)."""
        if read_path not in READ_PATHS:
            raise InputError(f"read_path={read_path!r}: choose one of {', '.join(READ_PATHS)}")
        self.read_path = read_path
        self.backend = open_backend(path, storage_options)
        self.root = self.backend.root
        attrs = layout.read_manifest_attrs(self.backend)
        if attrs is None and _is_export(self.backend):
            raise StoreError(
                f"{self.root} is a webdataset export, which is read as a stream (fcache.store.open(...).stream()); "
                "this needs random access: give the store it was exported from"
            )
        if attrs is None:
            raise StoreError(f"{self.root} is not an fcache store (no zarr.json with an fcache manifest); check the path")
        self.attrs: dict[str, Any] = attrs
        self.manifest = layout.manifest_from_attrs(self.attrs, self.backend)
        if check:
            check_consistent(self.backend, self.manifest)
        sane = self.manifest.storage.shard_size >= 1 and self.n >= 0  # else only verify opens it, to name the problem
        self.ledger = layout.read_records(self.backend, self.units) if sane else {}
        self.cache = (str(cache_dir), parse_size(cache_size or 0)) if cache_dir and self.backend.remote else None
        if self.cache is not None and check:
            check_writable(self.cache[0], "--cache-dir", fix="give a folder you can write to, or no --cache-dir")
        self._handles: dict[str, zarr.Array] = {}
        self._pid = os.getpid()
        self._checked: dict[tuple[str, int], str] = {}  # (level, unit) -> the shard's key, once its size is checked
        self._fetcher: ShardFetcher | None = None
        self._fetcher_pid = -1
        self._scales: dict[tuple[str, int], np.ndarray] = {}  # (level, unit) -> scales of the unit's sample-views
        self._geometry_units: dict[int, np.ndarray] = {}
        self._codes: dict[str, LevelCode] = {}
        self._expected: Expected | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"backend": self.backend, "cache": self.cache, "read_path": self.read_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        cache = state["cache"]
        FeatureStore.__init__(
            self, state["backend"], cache_dir=cache[0] if cache else None, cache_size=cache[1] if cache else None, check=False,
            read_path=state["read_path"],
        )  # fmt: skip

    @property
    def url(self) -> str:
        return self.backend.url

    # -- shape of the store -------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.manifest.dataset.n

    @property
    def num_views(self) -> int:
        return self.manifest.num_views

    @property
    def levels(self) -> tuple[LevelSpec, ...]:
        return self.manifest.levels

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    @property
    def video(self) -> bool:
        return self.manifest.video

    @cached_property
    def units(self) -> list[layout.Unit]:
        return layout.units(self.n, self.manifest.storage.shard_size)

    @cached_property
    def bases(self) -> dict[str, np.ndarray]:
        """The fitted basis of each level stored in a projected form (``basis/<level>``)."""
        from fcache.store.writer import read_bases

        return read_bases(self.backend, self.manifest)

    @property
    def quantisation_error(self) -> dict[str, float]:
        return dict(self.attrs.get("quantisation_error", {}))

    # -- per-sample metadata ------------------------------------------------------------------
    @cached_property
    def keys(self) -> np.ndarray:
        return np.asarray(self.array(layout.KEYS)[:], dtype=object)

    @cached_property
    def status(self) -> np.ndarray:
        """(N,) uint8 statuses as the ledger records them (``samples/status`` holds the same; ``fcache verify`` compares
        them); samples of uncommitted units read as pending."""
        out = np.full(self.n, int(Status.PENDING), dtype=np.uint8)
        for rec in self.ledger.values():
            out[rec.start : rec.stop] = rec.status
        return out

    @cached_property
    def ok_indices(self) -> np.ndarray:
        """Samples that have features (ok, or video_partial)."""
        return np.flatnonzero(np.isin(self.status, [int(s) for s in Status if s.has_features]))

    @cached_property
    def geometry_array(self) -> np.ndarray:
        """(N, V, len(GEOMETRY_FIELDS)) float32."""
        return np.asarray(self.array(layout.GEOMETRY)[:], dtype=np.float32)

    def geometry(self, i: int, view: int = 0) -> Geometry:
        return Geometry.from_array(self.geometry_rows(i)[view])

    def geometry_rows(self, i: int) -> np.ndarray:
        """(V, len(GEOMETRY_FIELDS)) float32 of sample ``i``, read with its unit's chunk (the last units read are kept),
        so one sample does not read the whole array."""
        if "geometry_array" in self.__dict__:
            return self.geometry_array[i]
        unit = layout.unit_of(i, self.manifest.storage.shard_size, self.n)
        rows = self._geometry_units.pop(unit.index, None)
        if rows is None:
            rows = np.asarray(self.array(layout.GEOMETRY)[unit.start : unit.stop], dtype=np.float32)
            while len(self._geometry_units) >= GEOMETRY_UNITS_KEPT:
                self._geometry_units.pop(next(iter(self._geometry_units)))
        self._geometry_units[unit.index] = rows  # most recent last
        return rows[i - unit.start]

    def status_counts(self) -> dict[str, int]:
        vals, cnt = np.unique(self.status, return_counts=True)
        return {Status(int(v)).label: int(c) for v, c in zip(vals, cnt, strict=True)}

    # -- targets ------------------------------------------------------------------------------
    def _group(self, path: str) -> zarr.Group:
        return zarr.open_group(self.backend.zarr_store(), path=path, mode="r", zarr_format=3, use_consolidated=False)

    @cached_property
    def target_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._group(layout.TARGETS).array_keys()))

    @cached_property
    def target_attrs(self) -> dict[str, Any]:
        return self._group(layout.TARGETS).attrs.asdict()

    def target(self, name: str, i: int | slice | None = None) -> Any:
        """Values of ``targets/<name>``: all of them, or sample ``i`` (a ``str`` for string targets)."""
        if name not in self.target_names:
            have = ", ".join(self.target_names) or "none"
            raise StoreError(f"{self.root} has no target {name!r} (it has: {have})")
        arr = self.array(f"{layout.TARGETS}/{name}")
        return _plain(np.asarray(arr[:] if i is None else arr[i]))

    def targets_many(self, name: str, indices: Sequence[int]) -> list[Any]:
        """``target(name, i)`` of several samples, read concurrently."""
        self.target(name, slice(0, 0))  # names the target's absence
        return [_plain(v) for v in _gather(self.array(f"{layout.TARGETS}/{name}"), [int(i) for i in indices])]

    # -- features -----------------------------------------------------------------------------
    def array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():  # forked into a DataLoader worker: fresh handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = zarr.open_array(self.backend.zarr_store(), path=name, mode="r", zarr_format=3)
        return self._handles[name]

    def read(self, level: str, i: int, view: int | None = None) -> np.ndarray:
        """Float32 features of sample ``i``: (V, C, H, W) or, with ``view``, (C, H, W) (video: with T before C)."""
        self.manifest.level(level)
        if self.fetcher is not None and self.fetcher.supports(level):
            return self.read_many([(level, i, view)])[0]
        return self._decoded(level, *self._zarr_values(level, i, view))

    def _zarr_values(self, level: str, i: int, view: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored values and side data of sample ``i`` (view ``view``, or all) through zarr's own path."""
        self.check_shards([(level, i)])
        return self._stored(level, (i,) if view is None else (i, view), layout.unit_of(i, self.manifest.storage.shard_size, self.n))

    def read_unit(self, level: str, unit: layout.Unit) -> np.ndarray:
        """Float32 features of every sample of a committed unit: (n, V, C, H, W) (video: T before C), the samples
        without features as the zeros they are stored as; the shard is checked as ``read`` checks it."""
        self.manifest.level(level)
        rec = self.ledger.get(unit.index)
        if rec is None:
            raise StoreError(f"unit {unit.name} of {self.root} is not committed (samples {unit.start}-{unit.stop - 1})")
        with_features = [unit.start + j for j, s in enumerate(rec.status) if Status(s).has_features]
        self.check_shards([(level, i) for i in with_features[:1]])
        return self._decoded(level, *self._stored(level, slice(unit.start, unit.stop), unit))

    def _decoded(self, level: str, values: np.ndarray, side: np.ndarray | None) -> np.ndarray:
        return decode(values, self.manifest.storage.form(level), side, self.width(level), self.bases.get(level))

    def _stored(self, level: str, sel: Any, unit: layout.Unit) -> tuple[np.ndarray, np.ndarray | None]:
        """``features/<level>[sel]`` and its scales as stored; CorruptStoreError naming the unit's shard."""
        try:
            values = np.asarray(self.array(f"{layout.FEATURES}/{level}")[sel])
            scaled = stored(self.manifest.storage.form(level)).scaled
            return values, np.asarray(self.array(f"{layout.SCALES}/{level}")[sel]) if scaled else None
        except (ValueError, RuntimeError) as e:
            raise CorruptStoreError(
                f"{self.root}: level {level}, shard {unit.index} (samples {unit.start}-{unit.stop - 1}) is corrupt ({e}); "
                f"run `fcache verify {self.root}` and re-extract that unit"
            ) from e

    def width(self, level: str) -> int:
        """W of a level's maps (its stored values may be packed along it)."""
        return self.manifest.level_shape(level)[-1]

    def read_many(self, requests: Sequence[tuple[str, int, int | None]]) -> list[np.ndarray]:
        """``read(level, i, view)`` of many requests, read and decoded together (on object storage all in flight at once)."""
        fetcher = self.fetcher
        if fetcher is None or not all(fetcher.supports(lv) for lv, _, _ in requests):
            return [self.read(lv, i, v) for lv, i, v in requests]
        return fetcher.read(requests, convert=self._to_float(self._unit_scales(requests)))  # by the thread that decoded each chunk

    def read_stream(self, requests: Iterable[tuple[str, int, int | None]], window: int = READ_AHEAD) -> Iterator[np.ndarray]:
        """``read(level, i, view)`` of each request in order, read ahead (``fcache.store.readahead``): ``window`` range
        requests kept in flight while the chunks that landed decode. The values of ``read_many``, bit for bit."""
        fetcher = self._direct()
        if fetcher is None:
            for block in blocks(requests, window):
                yield from self.read_many(block)
            return
        scales: dict[tuple[str, int], np.ndarray] = {}
        yield from ReadAhead(fetcher, requests, window, self._to_float(scales), lambda block: scales.update(self._unit_scales(block)))

    def expect(self, requests: Iterable[tuple[str, int, int | None]] | None, window: int = READ_AHEAD) -> None:
        """Tell this process's reader the requests its next ``read_stored`` calls will ask for, in order: they are read ahead
        (``window`` range requests in flight) and taken while they match (``fcache.store.readahead.Expected``). None:
        stop reading ahead."""
        if self._expected is not None:
            self._expected.close()
        fetcher = self._direct()
        self._expected = Expected(ReadAhead(fetcher, requests, window, None, lambda _: None)) if requests and fetcher is not None else None

    @property
    def expecting(self) -> bool:
        """Whether requests told to ``expect`` are still being read ahead (not ended by a mismatch or their end)."""
        return self._expected is not None and self._expected.open

    def _direct(self) -> ShardFetcher | None:
        """The fetcher where it reads every level of the store (read ahead), else None (zarr's own path)."""
        fetcher = self.fetcher
        return fetcher if fetcher is not None and all(fetcher.supports(lv.name) for lv in self.manifest.levels) else None

    def _to_float(self, scales: Mapping[tuple[str, int], np.ndarray]) -> Convert:
        return to_float32(self.manifest, self.bases, scales)

    def _unit_scales(self, requests: Sequence[tuple[str, int, int | None]]) -> dict[tuple[str, int], np.ndarray]:
        """Checks the requests (levels, committed samples, shards) and gives the side data of each scaled level's units they
        touch, by (level, unit index): (samples, V, ..., C) (the last units read are kept)."""
        for lv, _, _ in requests:
            self.manifest.level(lv)
        self.check_shards([(lv, i) for lv, i, _ in requests])
        storage = self.manifest.storage
        scaled = {lv for lv, _, _ in requests if stored(storage.form(lv)).scaled}
        units = sorted({(lv, layout.unit_of(i, storage.shard_size, self.n)) for lv, i, _ in requests if lv in scaled}, key=str)
        scales = {(lv, u.index): self._scales[(lv, u.index)] for lv, u in units if (lv, u.index) in self._scales}
        todo = [(lv, u) for lv, u in units if (lv, u.index) not in scales]
        for (lv, u), s in zip(todo, self._gather_scales(todo), strict=True):
            self._scales[(lv, u.index)] = scales[(lv, u.index)] = s
        return scales

    def code(self, level: str) -> LevelCode:
        """How ``level``'s stored values decode on a training device (its form, width and basis as a tensor)."""
        if level not in self._codes:
            import torch

            from fcache.store.transit import LevelCode

            basis = self.bases.get(level)
            self._codes[level] = LevelCode(
                self.manifest.storage.form(level), self.width(level), None if basis is None else torch.from_numpy(basis)
            )
        return self._codes[level]

    def read_stored(self, levels: Sequence[str], picked: Sequence[tuple[int, int | None]]) -> dict[str, Stored]:
        """The stored values and side data of ``levels`` of each (sample, view) of ``picked`` (view None: all views), for a
        training device to decode (``fcache.store.transit``): one batch per level, (n, ...) tensors whose row k is
        ``picked[k]``'s (``Stored.row``). Each chunk is decompressed straight into its row (in shared memory inside a
        DataLoader worker); ``read_many`` gives the same values decoded to float32."""
        from fcache.store.transit import Stored, empty, torch_dtype

        every = {v is None for _, v in picked}
        assert len(every) <= 1, "all views of every sample, or one view of each"
        lead = (self.num_views,) if every == {True} else ()
        forms = {lv: stored(self.manifest.storage.form(lv)) for lv in levels}
        shapes = {lv: self.manifest.level_shape(lv) for lv in levels}
        values = {lv: empty((len(picked), *lead, *forms[lv].stored_shape(shapes[lv])), torch_dtype(forms[lv].numpy)) for lv in levels}
        requests = [(lv, i, v) for i, v in picked for lv in levels]
        rows = [values[lv][k].numpy() for k in range(len(picked)) for lv in levels]
        sides = self._read_stored_into(requests, rows)
        out = {}
        for j, lv in enumerate(levels):
            d, side = forms[lv], None
            if d.side is not None:
                side = empty((len(picked), *lead, *d.side_shape(shapes[lv])), torch_dtype(d.side))
                for k in range(len(picked)):
                    dst = side[k].numpy()
                    dst[...] = np.asarray(sides[k * len(levels) + j]).view(dst.dtype)
            out[lv] = Stored(values[lv], side, self.code(lv))
        return out

    def _read_stored_into(self, requests: Sequence[tuple[str, int, int | None]], rows: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """Each request's stored values written into its row; its side data (None for a form without)."""
        fetcher = self.fetcher
        if fetcher is None or not all(fetcher.supports(lv) for lv, _, _ in requests):
            got = [self._zarr_values(lv, i, v) for lv, i, v in requests]
            for (values, _), row in zip(got, rows, strict=True):
                row.view(values.dtype)[...] = values
            return [side for _, side in got]
        scales = self._unit_scales(requests)
        taken = self._expected.take(requests) if self._expected is not None else []
        for row, values in zip(rows, taken, strict=False):
            row.view(values.dtype)[...] = values
        if len(taken) < len(requests):
            fetcher.read(requests[len(taken) :], out=rows[len(taken) :])
        sides: list[np.ndarray | None] = []
        for lv, i, v in requests:
            unit = layout.unit_of(i, self.manifest.storage.shard_size, self.n)
            per_unit = scales.get((lv, unit.index))
            sides.append(None if per_unit is None else per_unit[i - unit.start] if v is None else per_unit[i - unit.start, v])
        return sides

    def _gather_scales(self, todo: Sequence[tuple[str, layout.Unit]]) -> list[np.ndarray]:
        by_level: dict[str, list[layout.Unit]] = {}
        for lv, u in todo:
            by_level.setdefault(lv, []).append(u)
        got = {}
        for lv, us in by_level.items():
            for u, s in zip(us, _gather(self.array(f"{layout.SCALES}/{lv}"), [slice(u.start, u.stop) for u in us]), strict=True):
                got[(lv, u.index)] = s
        if len(self._scales) > 4096:
            self._scales.clear()
        return [got[(lv, u.index)] for lv, u in todo]

    @property
    def fetcher(self) -> ShardFetcher | None:
        """The direct read path of this process (``fcache.store.fetch``): shard indexes kept, chunks read by byte range
        and decoded here, on local disk as on object storage; None where zarr's own path reads (``read_path="zarr"``,
        kept to compare the two)."""
        if self.read_path == "zarr":
            return None
        if self._fetcher is None or self._fetcher_pid != os.getpid():
            cache = DiskCache(self.cache[0], self.cache[1], self.backend.url) if self.cache else None
            self._fetcher, self._fetcher_pid = ShardFetcher(self.backend, self.manifest, self.ledger, cache), os.getpid()
            self._scales = {}
        return self._fetcher

    def check_shards(self, items: Sequence[tuple[str, int]]) -> None:
        """For each (level, sample): its unit is committed, the sample has features, and the level's shard object is
        the one the ledger recorded (its size; one request per shard, all at once, the first time only)."""
        todo: dict[tuple[str, int], tuple[str, int | None, layout.Unit]] = {}
        for level, i in items:
            if not 0 <= i < self.n:
                raise IndexError(f"sample {i} out of range (store has {self.n})")
            unit = layout.unit_of(i, self.manifest.storage.shard_size, self.n)
            self._check_record(level, i, unit)
            if (level, unit.index) in self._checked or (level, unit.index) in todo:
                continue
            key = layout.shard_key(f"{layout.FEATURES}/{level}", unit.index, 2 + len(self.manifest.level_shape(level)))
            entry = self.ledger[unit.index].files.get(key)
            todo[(level, unit.index)] = (key, entry.size if entry else None, unit)
        if not todo:
            return
        sizes = self.backend.sizes([key for key, _, _ in todo.values()])
        for ((level, u), (key, want, unit)), size in zip(todo.items(), sizes, strict=True):
            if size != want:
                what = "is missing" if size is None else f"has {size} bytes, the ledger recorded {want}"
                raise CorruptStoreError(
                    f"{self.backend.where(key)} {what} (level {level}, samples {unit.start}-{unit.stop - 1}); "
                    f"run `fcache verify {self.root}` and re-extract that unit"
                )
            self._checked[(level, u)] = key

    def _check_record(self, level: str, i: int, unit: layout.Unit) -> None:
        rec = self.ledger.get(unit.index)
        if rec is None:
            raise StoreError(f"sample {i} of {self.root} is not extracted yet (unit {unit.name} is not committed); rerun extract to finish")
        status = Status(rec.status[i - unit.start])
        if not status.has_features:
            raise StoreError(f"sample {i} ({self.keys[i]}) has status {status.label} and no features")

    def dataset(
        self,
        levels: Sequence[str] | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        view: int | str = 0,
        views: Sequence[int] | None = None,
        seed: int = 0,
        targets: Sequence[str] = (),
        stored: bool = False,
    ) -> FeatureDataset:
        """A torch Dataset over ok samples (or ``indices``). See :class:`FeatureDataset`."""
        from fcache.store.dataset import FeatureDataset

        return FeatureDataset(self, levels, indices=indices, view=view, views=views, seed=seed, targets=targets, stored=stored)

    def to_dask(self, level: str) -> Any:
        """Float32 dask array (N, V, C, H, W) (video: (N, V, T, C, H, W)), decoded lazily, one dask chunk per
        shard (a task per shard file, not per sample-view: a COCO-train store is a graph of thousands of tasks)."""
        import dask.array as da

        self.manifest.level(level)
        arr = self.array(f"{layout.FEATURES}/{level}")
        per_shard = (self.manifest.storage.shard_size, *arr.shape[1:])
        raw = da.from_zarr(arr, chunks=per_shard)
        form, width, basis = self.manifest.storage.form(level), self.width(level), self.bases.get(level)
        channels = self.manifest.level(level).channels
        chunks = (*raw.chunks[:-3], (channels,), raw.chunks[-2], (width,))
        if stored(form).scaled:
            scales = da.from_zarr(self.array(f"{layout.SCALES}/{level}"), chunks=per_shard[:-2])
            return da.map_blocks(lambda v, s: decode(v, form, s[..., 0, 0], width, basis), raw, scales[..., None, None],
                                 dtype=np.float32, chunks=chunks)  # fmt: skip
        return raw.map_blocks(decode, form, None, width, basis, dtype=np.float32, chunks=chunks)


def _plain(values: np.ndarray) -> Any:
    """Variable-length strings as plain Python ``str`` at the boundary; numbers as they are."""
    if values.dtype.kind in "OTU":
        return str(values[()]) if values.ndim == 0 else np.asarray(values, dtype=object)
    return values


def _gather(arr: zarr.Array, selections: Sequence[Any]) -> list[np.ndarray]:
    """``arr[sel]`` for each selection, all read concurrently on zarr's event loop."""
    import asyncio

    from zarr.core.sync import sync

    async def read_all() -> list[Any]:
        return list(await asyncio.gather(*(arr._async_array.getitem(sel) for sel in selections)))

    return [np.asarray(v) for v in sync(read_all())]


def _is_export(backend: Backend) -> bool:
    """Whether ``backend`` holds a webdataset export (``fcache.store.webdataset``, which imports torch) and no store."""
    from fcache.store.webdataset import is_export

    return is_export(backend)
