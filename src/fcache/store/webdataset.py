"""``fcache export-wds``: a store as webdataset tar shards, and reading such an export back as a stream.

One member group per sample with features, named by its index (``000000042``): ``<level>.npy`` the stored values of
every view (V, C, H, W) (video (V, T, C, H, W)) in the level's stored form (bf16 as its raw 16 bits, packed forms
packed along W, scaled forms with ``<level>.scales.npy``), ``geometry.json`` (each view's geometry, by field) and
``targets.json`` (the sample's source key, status and targets). ``fcache-wds.json`` beside the shards holds the
store's manifest, the shard names and the sample count; it is written last, so an export is complete once it exists.
Shards are cut at ``shard_size`` bytes.

An export is streaming-only: ``fcache.store.open`` on it returns a :class:`WdsExport`, whose ``stream()`` is a torch
IterableDataset of items shaped like ``FeatureDataset``'s (float32 features, geometry, targets), shards split over
DataLoader workers, with an optional seeded shuffle buffer. ``fcache train-head`` needs random access (bit-exact
resume, seeded views per epoch) and takes the store itself, not an export.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcache.common.errors import InputError, StoreError
from fcache.common.files import check_writable
from fcache.spec import GEOMETRY_FIELDS, Manifest, Status
from fcache.store import layout
from fcache.store.backends import Backend, Range, open_backend, overlapping
from fcache.store.dtypes import decode, stored

INDEX = "fcache-wds.json"
FORMAT = "fcache-wds/1"
READ_BLOCK = 8 << 20  # bytes per range request when streaming a shard from object storage


def export_wds(
    store: Any,
    out: str | Path,
    *,
    shard_size: int,
    levels: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the samples of ``store`` (a ``FeatureStore``) that have features as tar shards into ``out`` (a folder or URL)."""
    target = open_backend(out, storage_options)
    if shard_size < 1:
        raise InputError(f"--shard-size {shard_size} bytes: a shard must hold at least one byte; give e.g. 1GB or 512MiB")
    if overlapping(store.backend, target):
        raise StoreError(f"{target.url} and the store {store.url} are one location or one lies inside the other; export outside the store")
    if not target.remote:
        check_writable(target.root, "--out")
    if target.exists(INDEX) or target.exists(layout.ROOT_META):
        raise StoreError(f"{target.url} already holds an export or a store; export into a new location")
    if not target.is_empty():  # files of the user's, or the shards of an interrupted export
        raise StoreError(
            f"{target.url} holds files but no finished export (files of yours, or the shards of an interrupted export); "
            "export into a new or empty location"
        )
    names = list(levels or store.level_names)
    for lv in names:
        store.manifest.level(lv)
    indices = [int(i) for i in store.ok_indices]
    shards: list[str] = []
    writer = _ShardWriter(target, shard_size, shards)
    try:
        for start in range(0, len(indices), 16):
            batch = indices[start : start + 16]
            raw = _stored_values(store, names, batch)
            targets = {name: store.targets_many(name, batch) for name in store.target_names}
            for k, i in enumerate(batch):
                members = {}
                for lv in names:
                    values, scales = raw[lv][k]
                    members[f"{lv}.npy"] = _npy(values)
                    if scales is not None:
                        members[f"{lv}.scales.npy"] = _npy(scales)
                members["geometry.json"] = _json([dict(zip(GEOMETRY_FIELDS, map(float, g), strict=True)) for g in store.geometry_array[i]])
                sample = {"index": i, "key": str(store.keys[i]), "status": Status(int(store.status[i])).label}
                members["targets.json"] = _json(sample | {name: _jsonable(targets[name][k]) for name in store.target_names})
                writer.add(f"{i:09d}", members)
            if progress:
                progress(len(batch))
        writer.close()
    finally:
        writer.discard()
    index = {"format": FORMAT, "manifest": store.attrs, "levels": names, "samples": len(indices), "shards": shards}
    index["bases"] = {lv: store.bases[lv].tolist() for lv in names if lv in store.bases}  # projected forms: float32, exact
    index |= {"target_names": list(store.target_names), "target_attrs": store.target_attrs}
    target.put(INDEX, _json(index))
    return {"out": target.url, "samples": len(indices), "shards": len(shards), "levels": names}


def _stored_values(store: Any, levels: Sequence[str], indices: Sequence[int]) -> dict[str, list[tuple[np.ndarray, np.ndarray | None]]]:
    """Stored (undecoded) values and scales of every view of each sample, per level."""
    store.check_shards([(lv, i) for lv in levels for i in indices])
    out: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {}
    for lv in levels:
        scaled = stored(store.manifest.storage.form(lv)).scaled
        if store.fetcher is not None and store.fetcher.supports(lv):
            values = store.fetcher.read([(lv, i, None) for i in indices])
        else:
            arr = store.array(f"{layout.FEATURES}/{lv}")
            values = [np.asarray(arr[i]) for i in indices]
        scales = [np.asarray(store.array(f"{layout.SCALES}/{lv}")[i]) for i in indices] if scaled else [None] * len(indices)
        out[lv] = list(zip(values, scales, strict=True))
    return out


class _ShardWriter:
    """Tar shards written to a local temporary file, each uploaded (or renamed into the folder) once full."""

    def __init__(self, target: Backend, shard_size: int, shards: list[str]) -> None:
        self.target, self.shard_size, self.shards = target, shard_size, shards
        self.tmp: Path | None = None
        self.tar: tarfile.TarFile | None = None

    def add(self, name: str, members: Mapping[str, bytes]) -> None:
        if self.tar is None:
            fd, path = tempfile.mkstemp(prefix="fcache-wds-", suffix=".tar")
            os.close(fd)
            self.tmp, self.tar = Path(path), tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in close()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{name}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
        if self.tmp is not None and self.tmp.stat().st_size >= self.shard_size:
            self.close()

    def close(self) -> None:
        if self.tar is None or self.tmp is None:
            return
        self.tar.close()
        key = f"shard-{len(self.shards):06d}.tar"
        self.target.put_file(key, self.tmp)
        self.shards.append(key)
        self.tmp.unlink(missing_ok=True)
        self.tar, self.tmp = None, None

    def discard(self) -> None:
        if self.tar is not None:
            self.tar.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def is_export(backend: Backend) -> bool:
    return not backend.exists(layout.ROOT_META) and backend.exists(INDEX)


class WdsExport:
    """A webdataset export, read back: its manifest, and ``stream()``. Picklable (location and options only)."""

    def __init__(self, location: str | Path | Backend, storage_options: Mapping[str, Any] | None = None) -> None:
        self.backend = open_backend(location, storage_options)
        raw = self.backend.get(INDEX)
        if raw is None:
            raise StoreError(f"{self.backend.url} is not a webdataset export (no {INDEX}); check the path")
        self.index = json.loads(raw)
        if self.index.get("format") != FORMAT:
            raise StoreError(f"{self.backend.where(INDEX)} has format {self.index.get('format')!r}; this fcache reads {FORMAT}")
        self.manifest = Manifest.from_dict(self.index["manifest"])
        self.bases = {lv: np.asarray(b, dtype=np.float32) for lv, b in self.index.get("bases", {}).items()}
        self.root = self.backend.root

    @property
    def n(self) -> int:
        return int(self.index["samples"])

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(self.index["levels"])

    @property
    def shards(self) -> list[str]:
        return list(self.index["shards"])

    def stream(self, levels: Sequence[str] | None = None, *, shuffle: int = 0, seed: int = 0, view: int | None = 0) -> Any:
        """A torch IterableDataset of items ``{"index", "view", "features", "geometry", "targets"}``.

        Args:
            shuffle: size of a seeded shuffle buffer (0: in order); shards are also visited in a seeded order.
            view: the view of each item (None: every view, features (V, ...)).
        """
        return _Stream(self, tuple(levels or self.level_names), shuffle, seed, view)

    def samples(self, shards: Sequence[str] | None = None) -> Iterator[dict[str, bytes]]:
        """The raw member groups of the shards, in order: ``{"__key__": name, "<ext>": bytes, ...}``."""
        for shard in shards if shards is not None else self.shards:
            group: dict[str, Any] = {}
            with tarfile.open(fileobj=_Reader(self.backend, shard), mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if group and group["__key__"] != key:
                        yield group
                        group = {}
                    group["__key__"] = key
                    f = tar.extractfile(member)
                    group[ext] = f.read() if f is not None else b""
            if group:
                yield group

    def item(self, group: Mapping[str, bytes], levels: Sequence[str], view: int | None) -> dict[str, Any]:
        """One sample's member group decoded into a ``FeatureDataset``-shaped item (features float32 tensors)."""
        storage = self.manifest.storage
        meta = json.loads(group["targets.json"])
        geometry = np.asarray([[g[f] for f in GEOMETRY_FIELDS] for g in json.loads(group["geometry.json"])], dtype=np.float32)
        feats = {}
        for lv in levels:
            values = np.load(io.BytesIO(group[f"{lv}.npy"]))
            scales = np.load(io.BytesIO(group[f"{lv}.scales.npy"])) if f"{lv}.scales.npy" in group else None
            x = decode(values, storage.form(lv), scales, self.manifest.level_shape(lv)[-1], self.bases.get(lv))
            feats[lv] = torch.from_numpy(x if view is None else np.ascontiguousarray(x[view]))
        v = 0 if view is None else view
        targets = {k: val for k, val in meta.items() if k not in ("index", "key", "status")}
        return {"index": meta["index"], "view": v, "features": feats, "geometry": torch.from_numpy(geometry[v]), "targets": targets}


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, export: WdsExport, levels: tuple[str, ...], shuffle: int, seed: int, view: int | None) -> None:
        self.export, self.levels, self.shuffle, self.seed, self.view = export, levels, shuffle, seed, view
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.export.n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = self.export.shards
        rng = random.Random(f"{self.seed}-{self.epoch}")
        if self.shuffle:
            rng.shuffle(shards)
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shards = shards[info.id :: info.num_workers]
        items = (self.export.item(g, self.levels, self.view) for g in self.export.samples(shards))
        if not self.shuffle:
            yield from items
            return
        buffer: list[dict[str, Any]] = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


class _Reader(io.RawIOBase):
    """A shard read front to back: a local file, or blocks of range requests from object storage."""

    def __init__(self, backend: Backend, key: str) -> None:
        self.backend, self.key = backend, key
        self.size = backend.size(key)
        if self.size is None:
            raise StoreError(f"{backend.where(key)} is missing: the export is incomplete; export it again")
        self.pos, self.block, self.offset = 0, memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        assert self.size is not None
        if self.offset == len(self.block) and self.pos < self.size:
            stop = min(self.pos + READ_BLOCK, self.size)
            (data,) = self.backend.get_ranges([Range(self.key, self.pos, stop)])
            self.block, self.offset, self.pos = memoryview(data), 0, stop
        n = min(len(b), len(self.block) - self.offset)
        b[:n] = self.block[self.offset : self.offset + n]
        self.offset += n
        return n


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
