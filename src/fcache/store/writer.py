"""Creating a store and committing units into it (the design's commit protocol), on any backend.

The driver calls :func:`create` once: every array exists at full length N before any work, and the store appears
whole or not at all (``Backend.new_store``: a renamed temporary folder locally, the manifest created last on object
storage). Workers call :meth:`StoreWriter.write_unit`, which takes the unit's lease (``ledger/lock/<unit>.lock``),
writes each of its shards whole and commits by creating ``ledger/done/<unit>.json`` exclusively; the record holds
the size and sha256 of every object the unit wrote, as sent. Resume = units minus ledger.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from fcache.common.errors import StoreError
from fcache.spec import GEOMETRY_FIELDS, Manifest, Status, keys_digest
from fcache.store import layout
from fcache.store.backends import Backend, open_backend
from fcache.store.backends.zarrstores import Recording
from fcache.store.codecs import chunk_codecs, is_string_array, string_chunks, string_codecs
from fcache.store.dtypes import Encoded, encode, stored
from fcache.store.layout import Unit
from fcache.store.leases import Lease
from fcache.store.records import FileRecord, LedgerRecord
from fcache.store.shards import shard_bytes, sharded_as_features

WRITE_CONFIG: Any = {"write_empty_chunks": True}
LOCK_TIMEOUT_S = 600.0
LOCK_HEARTBEAT_S = 60.0
KEYS_CHUNK = 1 << 16  # samples per chunk of samples/key: read whole by every reader, a couple of objects for COCO train
LEFTOVER_TOPS = (layout.FEATURES, layout.SCALES, layout.BASIS, "samples", layout.TARGETS, layout.LEDGER, layout.ERRORS, layout.ROOT_META)


@dataclass(frozen=True)
class TargetSpec:
    """A per-sample target array ``targets/<name>`` of shape [N, *shape].

    dtype is a numpy dtype name or ``str`` (variable-length UTF-8, e.g. one JSON document per sample).
    """

    dtype: str
    shape: tuple[int, ...] = ()
    fill: Any = 0


def _refuse_foreign(root: Path) -> None:
    """--overwrite deletes the store folder: refuse when it holds anything a store does not."""
    foreign = sorted(p.name for p in root.iterdir() if p.name not in layout.STORE_ENTRIES and not p.name.endswith(layout.TEMP_SUFFIX))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise StoreError(f"{root} holds files fcache did not write ({shown}); move them out of the store, then rerun with --overwrite")


def create(
    path: str | Path | Backend,
    manifest: Manifest,
    keys: Sequence[str],
    *,
    targets: Mapping[str, TargetSpec] | None = None,
    target_attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    bases: Mapping[str, np.ndarray] | None = None,
    template: Backend | None = None,
) -> StoreWriter:
    """Create a store (or reopen it to resume, if its fingerprint matches) at a path or URL.

    ``bases``: level -> the fitted basis of each level stored in a projected form (``StoredDtype.fit`` on the first
    unit's features, or ``FormChoice.basis``); a resumed store keeps its own. ``template``: a store whose ``samples/``
    and ``targets/`` arrays (their metadata and the sample keys) the new store copies as they are, instead of making
    them from ``keys``, ``targets`` and ``target_attrs`` (``fcache recode``).

    Raises:
        StoreError: the location holds another configuration (names the fields that differ), or is not a store.
        FileExistsError: another process created a store there at the same moment.
    """
    backend = open_backend(path, storage_options)
    where = backend.url
    if len(keys) != manifest.dataset.n or keys_digest(list(keys)) != manifest.dataset.digest:
        raise ValueError("manifest.dataset.n/digest do not describe the given keys")
    local = None if backend.remote else Path(backend.root)
    if local is not None and local.is_symlink() and overwrite:
        raise StoreError(f"--out {local} is a symbolic link (to {local.resolve()}); give the store's own path to replace it")
    attrs = layout.read_manifest_attrs(backend)
    if attrs is not None:
        existing = layout.manifest_from_attrs(attrs, backend)
        if not overwrite:
            if existing.fingerprint != manifest.fingerprint:
                diffs = "; ".join(existing.differences(manifest))
                raise StoreError(
                    f"{where} holds a store of another configuration ({diffs}); "
                    "use the original settings to resume, or --overwrite to replace it"
                )
            return StoreWriter(backend)
        if local is not None:
            _refuse_foreign(local)
        backend.clear(keep=(_lease_key(),))
    elif not backend.is_empty():
        if not (backend.remote and leftovers_only(backend)):
            if overwrite:
                raise StoreError(f"{where} exists and is not an fcache store; refusing to replace it, choose another path")
            raise StoreError(f"{where} exists and is not an fcache store; choose another path")
        backend.clear(keep=(_lease_key(),))  # an interrupted creation left arrays without a manifest: invisible, redone
    fitted = _check_bases(manifest, dict(bases or {}))
    if template is None:
        backend.new_store(lambda store: _build(store, manifest, keys, dict(targets or {}), dict(target_attrs or {}), fitted))
    else:
        backend.new_store(lambda store: _build_from(store, manifest, template, fitted))
    return StoreWriter(backend)


def _check_bases(m: Manifest, bases: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The basis of every level in a projected form, shaped as its form says (ValueError naming what is missing)."""
    out = {}
    for lv in m.levels:
        want = stored(m.storage.form(lv.name)).basis_shape(lv.channels)
        if want is None:
            continue
        basis = bases.get(lv.name)
        if basis is None or tuple(basis.shape) != want:
            got = "none" if basis is None else str(tuple(basis.shape))
            raise ValueError(f"level {lv.name} is stored as {m.storage.form(lv.name)}: it needs a fitted basis {want}, got {got}")
        out[lv.name] = np.asarray(basis, dtype=np.float32)
    return out


def _lease_key() -> str:
    from fcache.store.lease import LEASE_KEY

    return LEASE_KEY


def leftovers_only(backend: Backend) -> bool:
    """Everything under the location is what an interrupted ``create`` leaves (arrays and ledger, no manifest)."""
    return all(k.split("/", 1)[0] in LEFTOVER_TOPS for k in backend.listing())


def _build(store: Any, m: Manifest, keys: Sequence[str], targets: dict[str, TargetSpec], target_attrs: dict,
           bases: dict[str, np.ndarray]) -> None:  # fmt: skip
    n, s, v = m.dataset.n, m.storage.shard_size, m.num_views
    g = zarr.open_group(store, mode="a", zarr_format=3)
    _feature_arrays(g, m, bases)
    keys_array = g.create_array(
        layout.KEYS,
        shape=(n,),
        chunks=(min(n, KEYS_CHUNK),),
        dtype=str,
        config=WRITE_CONFIG,
        dimension_names=("sample",),
        **string_codecs(),
    )
    keys_array[:] = np.array(list(keys), dtype=object)
    g.create_array(layout.STATUS, shape=(n,), chunks=(s,), dtype="uint8", fill_value=int(Status.PENDING), dimension_names=("sample",))
    g.create_array(
        layout.GEOMETRY,
        shape=(n, v, len(GEOMETRY_FIELDS)),
        chunks=(s, v, len(GEOMETRY_FIELDS)),
        dtype="float32",
        fill_value=0,
        attributes={"fields": list(GEOMETRY_FIELDS)},
        dimension_names=("sample", "view", "geometry_field"),
    )
    tg = g.create_group(layout.TARGETS, attributes=target_attrs)
    for name, t in targets.items():
        dims = ("sample", *(f"{name}_{k}" for k in range(len(t.shape))))
        if t.dtype == "str":
            tg.create_array(name, shape=(n,), chunks=(s,), dtype=str, dimension_names=dims, **string_codecs())
        else:
            tg.create_array(name, shape=(n, *t.shape), chunks=(1, *t.shape), shards=(s, *t.shape), dtype=t.dtype, fill_value=t.fill,
                            dimension_names=dims)  # fmt: skip
    g.attrs[layout.MANIFEST_ATTR] = m.to_dict()  # the root metadata, written last


def _feature_arrays(g: zarr.Group, m: Manifest, bases: dict[str, np.ndarray]) -> None:
    """``features/<level>`` at full length in its stored form, with ``scales/<level>`` for a form with side data and
    ``basis/<level>`` for a projected one."""
    n, s, v = m.dataset.n, m.storage.shard_size, m.num_views
    for lv in m.levels:
        form = m.storage.form(lv.name)
        d, shape = stored(form), m.level_shape(lv.name)
        values = d.stored_shape(shape)
        dims = layout.feature_dims(lv.name, len(shape), packed=d.per_byte > 1, projected=d.fitted)
        g.create_array(
            f"{layout.FEATURES}/{lv.name}",
            shape=(n, v, *values),
            chunks=(1, 1, *values),
            shards=(s, v, *values),
            dtype=d.numpy,
            compressors=chunk_codecs(m.storage.codec, form),
            fill_value=0,
            attributes={"fcache_dtype": form, "level": lv.to_dict(), "shape": list(shape)},
            dimension_names=dims,
        )
        if d.side is not None:
            per = d.side_shape(shape)  # (C,) or (T, C)
            g.create_array(f"{layout.SCALES}/{lv.name}", shape=(n, v, *per), chunks=(s, v, *per), dtype=d.side, fill_value=0,
                           dimension_names=dims[:-2])  # fmt: skip
        if lv.name in bases:
            basis = g.create_array(f"{layout.BASIS}/{lv.name}", shape=bases[lv.name].shape, dtype="float32", fill_value=0,
                                   dimension_names=(f"mean_and_component_{lv.name}", f"channel_{lv.name}"))  # fmt: skip
            basis[:] = bases[lv.name]


def _build_from(store: Any, m: Manifest, template: Backend, bases: dict[str, np.ndarray]) -> None:
    """A store of ``m`` whose sample and target arrays are ``template``'s, copied object by object: their metadata and
    the sample keys (the units' shards of them are written by the units)."""
    g = zarr.open_group(store, mode="a", zarr_format=3)
    _feature_arrays(g, m, bases)
    copied = sorted(
        k
        for k in template.listing()
        if k.split("/", 1)[0] in ("samples", layout.TARGETS)
        and (k.endswith(layout.ROOT_META) or k.startswith(f"{layout.KEYS}/c/"))
        and not k.endswith(layout.TEMP_SUFFIX)
    )
    _put(store, {k: data for k, data in zip(copied, template.get_many(copied), strict=True) if data is not None})
    g.attrs[layout.MANIFEST_ATTR] = m.to_dict()  # the root metadata, written last


def default_writers() -> int:
    """Threads encoding + compressing + committing units (extract's writers, recode's workers): compression, checksums
    and file writes release the GIL; one per 2 cores (1 on 2 cores, 8 at most).

    Measured on an H100 box (16 cores), SwinV2-L at 1024: 4 writers were the pipeline's bottleneck (0.71 of the bare forward).
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class StoreWriter:
    """Writes units into an existing store. Picklable (holds only its location), so it can travel to workers."""

    def __init__(self, path: str | Path | Backend, storage_options: Mapping[str, Any] | None = None) -> None:
        self.backend = open_backend(path, storage_options)
        self.root = self.backend.root
        attrs = layout.read_manifest_attrs(self.backend)
        if attrs is None:
            raise StoreError(f"{self.backend.url} is not an fcache store")
        self.manifest = layout.manifest_from_attrs(attrs, self.backend)
        self.units = layout.units(self.manifest.dataset.n, self.manifest.storage.shard_size)
        self._target_ndims: dict[str, int] | None = None
        self._bases: dict[str, np.ndarray] | None = None

    @property
    def bases(self) -> dict[str, np.ndarray]:
        """The fitted basis of each level in a projected form (read once)."""
        if self._bases is None:
            self._bases = read_bases(self.backend, self.manifest)
        return self._bases

    def __getstate__(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["backend"])  # type: ignore[misc]

    def committed(self) -> dict[int, LedgerRecord]:
        return layout.read_records(self.backend, self.units)

    def is_committed(self, unit: Unit) -> bool:
        return self.backend.exists(layout.done_key(unit))

    def tidy(self) -> list[str]:
        """Driver-side, under its lease before any unit runs: delete what writers killed mid-write left behind.

        That is their temporaries and the locks of units they had committed (killed between the commit and the
        release); the lock of an uncommitted unit stays, to be taken over once stale. Returns the keys deleted.
        """
        committed = self.committed()
        done = {layout.lock_key(u) for u in self.units if u.index in committed}
        locks = [k for k in self.backend.listing(f"{layout.LEDGER}/lock") if k in done]
        leftovers = [*self.backend.temporaries(), *locks]
        self.backend.delete(leftovers)
        return leftovers

    def pending(self) -> list[Unit]:
        """Units without a ledger record: all that remains to be done."""
        done = set(self.committed())
        return [u for u in self.units if u.index not in done]

    def write_targets(self, name: str, values: np.ndarray, start: int = 0, store: Any = None) -> None:
        """Driver-side: fill ``targets/<name>`` before any unit runs (e.g. annotations known from metadata); whole chunks
        of strings are encoded here and put at once (``codecs.string_chunks``), anything else goes through zarr."""
        arr = self._array(f"{layout.TARGETS}/{name}", store)
        if arr.dtype.kind in "OT":
            values = np.asarray(values, dtype=object)
            chunk, stop = arr.chunks[0], start + len(values)
            if store is None and start % chunk == 0 and (stop % chunk == 0 or stop == arr.shape[0]) and is_string_array(arr):
                first = start // chunk
                chunks = string_chunks(values, chunk)
                self.backend.put_many({layout.shard_key(arr.path, first + k, 1): data for k, data in enumerate(chunks)})
                return
        arr[start : start + len(values)] = values

    def write_unit(
        self,
        unit: Unit,
        features: Mapping[str, np.ndarray | Encoded],
        status: np.ndarray,
        geometry: np.ndarray,
        *,
        targets: Mapping[str, np.ndarray] | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        copied: Mapping[str, bytes] | None = None,
        hook: Callable[[str], None] | None = None,
    ) -> LedgerRecord | None:
        """Write one whole unit and commit it. Returns the ledger record, or None when another writer has it.

        Args:
            features: level -> float32 (n_unit, V, C, H, W) or (n_unit, V, T, C, H, W), failed samples zeros;
                or the same already ``Encoded`` in the level's stored form.
            status: (n_unit,) uint8 ``Status`` codes.
            geometry: (n_unit, V, len(GEOMETRY_FIELDS)) float32.
            targets: name -> (n_unit, ...) values for targets written by workers.
            errors: one dict per failed sample (key, status, message), kept in the ledger record.
            copied: key -> bytes of objects of the unit written as they are (``fcache recode``: its target shards).
            hook: called with the stage name before each step (tests use it to crash at a known point).
        """
        encoded = self._encode(unit, features, status, geometry)
        step = hook or (lambda stage: None)
        if self.is_committed(unit):
            return None
        lock = Lease(self.backend, layout.lock_key(unit), timeout=LOCK_TIMEOUT_S, heartbeat=LOCK_HEARTBEAT_S)
        if lock.acquire() is not None:
            return None
        try:
            if self.is_committed(unit):
                return None
            t0 = time.time()
            step("delete")
            keys = self._clear(unit)
            store = Recording(self.backend.zarr_store(read_only=False))
            for name, enc in encoded.items():
                step(f"level:{name}")
                self._write_features(unit, name, enc.values, store)
                if enc.scales is not None:
                    self._array(f"{layout.SCALES}/{name}", store)[unit.start : unit.stop] = enc.scales
            step("samples")
            self._array(layout.STATUS, store)[unit.start : unit.stop] = status.astype(np.uint8)
            self._array(layout.GEOMETRY, store)[unit.start : unit.stop] = geometry.astype(np.float32)
            for name, values in (targets or {}).items():
                self.write_targets(name, values, unit.start, store)
            _put(store, copied or {})
            step("commit")
            record = LedgerRecord(
                unit=unit.index,
                start=unit.start,
                stop=unit.stop,
                status=tuple(int(x) for x in status),
                status_counts=_counts(status),
                files=self._file_records(keys, store.written),
                quant={name: (float(enc.sq_err.sum()), float(enc.sq_ref.sum())) for name, enc in encoded.items()},
                errors=tuple(dict(e) for e in errors),
                host=socket.gethostname(),
                pid=os.getpid(),
                seconds=round(time.time() - t0, 3),
                time=time.time(),
                token=lock.token,
            )
            if self.backend.create(layout.done_key(unit), layout.json_bytes(record.to_dict())) is None:
                return None
            return record
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StoreError(
                    f"disk full while writing unit {unit.name} (samples {unit.start}-{unit.stop - 1}) to {self.backend.url}: "
                    "free some space and rerun the same command; committed units are intact"
                ) from e
            raise
        finally:
            lock.release()

    def _write_features(self, unit: Unit, name: str, values: np.ndarray, store: Any) -> None:
        """The unit's shard of ``features/<name>``, built by ``shards.shard_bytes`` when the array is laid out as new
        stores' are (the same bytes as zarr's), else through zarr."""
        arr = self._array(f"{layout.FEATURES}/{name}", store)
        codec, form = self.manifest.storage.codec, self.manifest.storage.form(name)
        if not sharded_as_features(arr, codec, form) or unit.start != unit.index * arr.shards[0]:  # type: ignore[index]
            arr[unit.start : unit.stop] = values
            return
        data = shard_bytes(values, arr.shards[0], codec, form)  # type: ignore[index]
        if data is not None:
            _put(store, {layout.shard_key(arr.path, unit.index, arr.ndim): data})

    def _file_records(self, keys: Sequence[str], written: Mapping[str, tuple[int, str]]) -> dict[str, FileRecord]:
        """Size and sha256 of the unit's objects: as sent for those just written, read back for the driver's targets."""
        out = {k: FileRecord(*written[k]) for k in keys if k in written}
        others = [k for k in keys if k not in written]
        for k, data in zip(others, self.backend.get_many(others), strict=True):
            if data is not None:
                out[k] = FileRecord(len(data), hashlib.sha256(data).hexdigest())
        return out

    def _encode(
        self, unit: Unit, features: Mapping[str, np.ndarray | Encoded], status: np.ndarray, geometry: np.ndarray
    ) -> dict[str, Encoded]:
        """Check shapes and encode float features; features already encoded (by the extraction, on its device) pass through."""
        m, n_u = self.manifest, len(unit)
        names = {lv.name for lv in m.levels}
        if set(features) != names:
            raise ValueError(f"unit {unit.name}: got levels {sorted(features)}, the store holds {sorted(names)}")
        if status.shape != (n_u,) or geometry.shape != (n_u, m.num_views, len(GEOMETRY_FIELDS)):
            raise ValueError(f"unit {unit.name}: status {status.shape} / geometry {geometry.shape} do not match {n_u} samples")
        out = {}
        for lv in m.levels:
            form = m.storage.form(lv.name)
            d, shape = stored(form), (n_u, m.num_views, *m.level_shape(lv.name))
            x = features[lv.name]
            values, want = (x.values, d.stored_shape(shape)) if isinstance(x, Encoded) else (x, shape)
            if tuple(values.shape) != want:
                raise ValueError(f"unit {unit.name}: level {lv.name} has shape {tuple(values.shape)}, expected {want}")
            if not isinstance(x, Encoded):
                x = encode(x, form, lv.name, basis=self.bases.get(lv.name))
            elif x.values.dtype != d.numpy or d.scaled != (x.scales is not None):
                raise ValueError(f"unit {unit.name}: level {lv.name} was encoded as {x.values.dtype}, the store holds {form}")
            out[lv.name] = x
        return out

    def unit_keys(self, unit: Unit) -> list[str]:
        return layout.unit_keys(self.manifest, unit, self.target_ndims())

    def target_ndims(self) -> dict[str, int]:
        if self._target_ndims is None:
            tg = zarr.open_group(self.backend.zarr_store(), path=layout.TARGETS, mode="r", zarr_format=3)
            self._target_ndims = {name: arr.ndim for name, arr in tg.arrays()}
        return self._target_ndims

    def _clear(self, unit: Unit) -> list[str]:
        """Delete the unit's objects (features, scales, samples; not driver-written targets) and temporaries."""
        keys = self.unit_keys(unit)
        self.backend.delete_temporaries(keys)
        self.backend.delete([k for k in keys if not k.startswith(f"{layout.TARGETS}/")])
        return keys

    def _array(self, name: str, store: Any = None) -> zarr.Array:
        store = store if store is not None else self.backend.zarr_store(read_only=False)
        return zarr.open_array(store, path=name, mode="r+", zarr_format=3, config=WRITE_CONFIG)

    def finalize(self) -> dict[str, Any]:
        """Driver-side, after the work: errors.jsonl and the measured statistics from the ledger."""
        ledger = self.committed()
        stats = summarize_ledger(ledger, len(self.units))
        lines = [json.dumps(e, sort_keys=True) for u in sorted(ledger) for e in ledger[u].errors]
        self.backend.put(layout.ERRORS, "".join(line + "\n" for line in lines).encode())
        attrs = layout.read_manifest_attrs(self.backend) or {}
        attrs["quantisation_error"] = stats["quantisation_error"]
        zarr.open_group(self.backend.zarr_store(read_only=False), mode="r+", zarr_format=3).attrs[layout.MANIFEST_ATTR] = attrs
        return stats


def read_bases(backend: Backend, m: Manifest) -> dict[str, np.ndarray]:
    """``basis/<level>`` of each level the manifest stores in a projected form."""
    fitted = [lv.name for lv in m.levels if stored(m.storage.form(lv.name)).fitted]
    store = backend.zarr_store()
    return {lv: np.asarray(zarr.open_array(store, path=f"{layout.BASIS}/{lv}", mode="r", zarr_format=3)[:]) for lv in fitted}


def _put(store: Any, objects: Mapping[str, bytes]) -> None:
    """Objects written as they are, through zarr's ``store`` (so a ``Recording`` notes them)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = default_buffer_prototype().buffer
    for key, data in objects.items():
        sync(store.set(key, buf.from_bytes(data)))


def summarize_ledger(ledger: Mapping[int, LedgerRecord], total_units: int) -> dict[str, Any]:
    """Status counts and per-level relative RMSE of the committed units."""
    counts: dict[str, int] = {}
    quant: dict[str, list[float]] = {}
    for rec in ledger.values():
        for k, c in rec.status_counts.items():
            counts[k] = counts.get(k, 0) + c
        for level, (err, ref) in rec.quant.items():
            acc = quant.setdefault(level, [0.0, 0.0])
            acc[0] += err
            acc[1] += ref
    rel = {lv: (float(np.sqrt(e / r)) if r > 0 else 0.0) for lv, (e, r) in sorted(quant.items())}
    return {"units_committed": len(ledger), "units_total": total_units, "status_counts": counts, "quantisation_error": rel}


def _counts(status: np.ndarray) -> dict[str, int]:
    vals, cnt = np.unique(status.astype(np.uint8), return_counts=True)
    return {Status(int(v)).label: int(c) for v, c in zip(vals, cnt, strict=True)}
