"""Reading a store: level specs, geometry, targets, a torch Dataset of float32 NCHW features, dask arrays.

Only committed units are visible: statuses of uncommitted units read as pending, and a shard whose
file is missing or has another size than its ledger record raises instead of returning fill values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from fcache.common.errors import CorruptStoreError, StoreError
from fcache.spec import Geometry, LevelSpec, Manifest, Status
from fcache.store import layout
from fcache.store.consistency import check_consistent
from fcache.store.dtypes import decode, stored

GEOMETRY_UNITS_KEPT = 64  # units of geometry a reader keeps (a few KB each)


def open_store(path: str | Path) -> FeatureStore:
    """Open a store for reading (the public ``fcache.store.open``)."""
    return FeatureStore(path)


class FeatureStore:
    """Read access to a feature store. Picklable; zarr handles are reopened in each process."""

    def __init__(self, path: str | Path, *, check: bool = True) -> None:
        self.root = Path(path)
        attrs = layout.manifest_attrs(self.root)
        if attrs is None:
            raise StoreError(f"{self.root} is not an fcache store (no zarr.json with an fcache manifest); check the path")
        self.attrs: dict[str, Any] = attrs
        self.manifest = Manifest.read(self.attrs, f"{self.root / 'zarr.json'} (the fcache manifest)")
        if check:
            check_consistent(self.root, self.manifest)
        self.ledger = layout.read_ledger(self.root, self.units if check else None)
        self._handles: dict[str, zarr.Array] = {}
        self._pid = os.getpid()
        self._checked: set[tuple[str, int]] = set()
        self._geometry_units: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        FeatureStore.__init__(self, state["root"])

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
    @cached_property
    def target_names(self) -> tuple[str, ...]:
        return tuple(sorted(zarr.open_group(str(self.root / layout.TARGETS), mode="r").array_keys()))

    @cached_property
    def target_attrs(self) -> dict[str, Any]:
        return zarr.open_group(str(self.root / layout.TARGETS), mode="r").attrs.asdict()

    def target(self, name: str, i: int | slice | None = None) -> Any:
        """Values of ``targets/<name>``: all of them, or sample ``i`` (a ``str`` for string targets)."""
        if name not in self.target_names:
            have = ", ".join(self.target_names) or "none"
            raise StoreError(f"{self.root} has no target {name!r} (it has: {have})")
        arr = self.array(f"{layout.TARGETS}/{name}")
        values = np.asarray(arr[:] if i is None else arr[i])
        if values.dtype.kind in "OTU":  # variable-length strings: plain Python str at the boundary
            return str(values[()]) if values.ndim == 0 else np.asarray(values, dtype=object)
        return values

    # -- features -----------------------------------------------------------------------------
    def array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():  # forked into a DataLoader worker: fresh handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = zarr.open_array(str(self.root / name), mode="r")
        return self._handles[name]

    def read(self, level: str, i: int, view: int | None = None) -> np.ndarray:
        """Float32 features of sample ``i``: (V, C, H, W) or, with ``view``, (C, H, W) (video: with T before C)."""
        self.manifest.level(level)
        self._check(level, i)
        arr = self.array(f"{layout.FEATURES}/{level}")
        sel = (i,) if view is None else (i, view)
        try:
            values = arr[sel]
            scales = self.array(f"{layout.SCALES}/{level}")[sel] if stored(self.manifest.storage.dtype).scaled else None
        except (ValueError, RuntimeError) as e:
            unit = layout.unit_of(i, self.manifest.storage.shard_size, self.n)
            raise CorruptStoreError(
                f"{self.root}: level {level}, shard {unit.index} (samples {unit.start}-{unit.stop - 1}) is corrupt ({e}); "
                f"run `fcache verify {self.root}` and re-extract that unit"
            ) from e
        return decode(np.asarray(values), self.manifest.storage.dtype, None if scales is None else np.asarray(scales))

    def _check(self, level: str, i: int) -> None:
        """The shard holding sample i is committed and its file is the one the ledger recorded."""
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} out of range (store has {self.n})")
        unit = layout.unit_of(i, self.manifest.storage.shard_size, self.n)
        if (level, unit.index) in self._checked:
            return
        rec = self.ledger.get(unit.index)
        if rec is None:
            raise StoreError(f"sample {i} of {self.root} is not extracted yet (unit {unit.name} is not committed); rerun extract to finish")
        status = Status(rec.status[i - unit.start])
        if not status.has_features:
            raise StoreError(f"sample {i} ({self.keys[i]}) has status {status.label} and no features")
        ndim = 2 + len(self.manifest.level_shape(level))
        path = layout.shard_file(self.root, f"{layout.FEATURES}/{level}", unit.index, ndim)
        entry = rec.files.get(str(path.relative_to(self.root)))
        want = entry.size if entry else None
        size = path.stat().st_size if path.exists() else None
        if size != want:
            what = "is missing" if size is None else f"has {size} bytes, the ledger recorded {want}"
            raise CorruptStoreError(
                f"{path} {what} (level {level}, samples {unit.start}-{unit.stop - 1}); "
                f"run `fcache verify {self.root}` and re-extract that unit"
            )
        self._checked.add((level, unit.index))

    def dataset(
        self,
        levels: Sequence[str] | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        view: int | str = 0,
        views: Sequence[int] | None = None,
        seed: int = 0,
        targets: Sequence[str] = (),
    ) -> FeatureDataset:
        """A torch Dataset over ok samples (or ``indices``). See :class:`FeatureDataset`."""
        return FeatureDataset(self, levels, indices=indices, view=view, views=views, seed=seed, targets=targets)

    def to_dask(self, level: str) -> Any:
        """Float32 dask array (N, V, C, H, W) (video: (N, V, T, C, H, W)), dequantised lazily, one dask chunk per
        shard (a task per shard file, not per sample-view: a COCO-train store is a graph of thousands of tasks)."""
        import dask.array as da

        self.manifest.level(level)
        arr = self.array(f"{layout.FEATURES}/{level}")
        per_shard = (self.manifest.storage.shard_size, *arr.shape[1:])
        raw = da.from_zarr(arr, chunks=per_shard)
        dtype = self.manifest.storage.dtype
        if stored(dtype).scaled:
            scales = da.from_zarr(self.array(f"{layout.SCALES}/{level}"), chunks=per_shard[:-2])
            return raw.astype(np.float32) * scales[..., None, None]
        return raw.map_blocks(decode, dtype, dtype=np.float32)


class FeatureDataset(torch.utils.data.Dataset):
    """Items ``{"index", "view", "features": {level: float32 tensor}, "geometry", "targets"}``.

    Item ``j`` is sample ``indices[j]``. Its view is ``view`` when an int; with ``view="random"``
    one of ``views`` drawn from (seed, epoch, sample), so each epoch sees a fresh view of every
    sample, reproducibly. An item may also be asked for as ``(j, view)``. Safe in DataLoader workers.
    """

    def __init__(
        self,
        store: FeatureStore,
        levels: Sequence[str] | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        view: int | str = 0,
        views: Sequence[int] | None = None,
        seed: int = 0,
        targets: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.levels = tuple(levels) if levels is not None else store.level_names
        for lv in self.levels:
            store.manifest.level(lv)
        self.indices = np.asarray(store.ok_indices if indices is None else indices, dtype=np.int64)
        if isinstance(view, str) and view != "random":
            raise ValueError(f"view must be an int or 'random', got {view!r}")
        self.view = view
        self.views = tuple(views) if views is not None else store.manifest.train_views
        self.seed, self.epoch = seed, 0
        self.targets = tuple(targets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def view_of(self, i: int) -> int:
        if self.view != "random":
            return int(self.view)
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        return int(self.views[rng.integers(len(self.views))])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        j, v = item if isinstance(item, tuple) else (item, None)
        i = int(self.indices[j])
        v = self.view_of(i) if v is None else int(v)
        feats = {lv: torch.from_numpy(self.store.read(lv, i, v)) for lv in self.levels}
        return {
            "index": i,
            "view": v,
            "features": feats,
            "geometry": torch.from_numpy(self.store.geometry_rows(i)[v].copy()),
            "targets": {name: self.store.target(name, i) for name in self.targets},
        }
