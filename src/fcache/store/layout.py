"""Where things live inside a store, as keys relative to its root, and the unit/shard arithmetic shared by writer and reader.

A unit of work is one shard along N (samples ``[u*S, min((u+1)*S, N))``); its ledger record is
``ledger/done/<unit>.json``, its write lock ``ledger/lock/<unit>.lock``. Keys are the same on every backend
(``fcache.store.backends``); the ``Path`` helpers below are the same keys under a local root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcache.common.errors import CorruptStoreError, StoreError
from fcache.common.records import load_json
from fcache.spec import Manifest
from fcache.store.backends import ROOT_META, Backend, open_backend
from fcache.store.backends.local import TEMP_SUFFIX
from fcache.store.dtypes import stored
from fcache.store.records import LedgerRecord

MANIFEST_ATTR = "fcache"
FEATURES = "features"
SCALES = "scales"
BASIS = "basis"  # basis/<level>: the fitted basis of a projected form (store-wide, written when the store is created)
KEYS = "samples/key"
STATUS = "samples/status"
GEOMETRY = "samples/geometry"
TARGETS = "targets"
LEDGER = "ledger"
ERRORS = "errors.jsonl"
STORE_ENTRIES = (ROOT_META, FEATURES, SCALES, BASIS, "samples", TARGETS, LEDGER, ERRORS)  # what a store folder holds at its top
__all__ = ["TEMP_SUFFIX", "ROOT_META"]  # re-exported: where temporaries and the manifest are


@dataclass(frozen=True)
class Unit:
    """One unit of work: a shard index and its sample range."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}"

    def __len__(self) -> int:
        return self.stop - self.start


def feature_dims(level: str, ndim: int, packed: bool = False, projected: bool = False) -> tuple[str, ...]:
    """zarr ``dimension_names`` of ``features/<level>`` for a level of ``ndim`` dims after (sample, view): (C, H, W) or
    video (T, C, H, W). Channel and spatial names carry the level (their sizes differ between levels), so that
    ``xarray.open_zarr(store, group="features")`` opens every level as one dataset; a packed width is
    ``x_<level>_packed``, projected channels ``component_<level>``."""
    x = f"x_{level}_packed" if packed else f"x_{level}"
    c = f"component_{level}" if projected else f"channel_{level}"
    return ("sample", "view", *(["time"] if ndim == 4 else []), c, f"y_{level}", x)


def units(n: int, shard_size: int) -> list[Unit]:
    return [Unit(u, s, min(s + shard_size, n)) for u, s in enumerate(range(0, n, shard_size))]


def unit_of(i: int, shard_size: int, n: int) -> Unit:
    start = (i // shard_size) * shard_size
    return Unit(i // shard_size, start, min(start + shard_size, n))


def shard_key(array: str, shard: int, ndim: int) -> str:
    """Key of the shard (or chunk) object holding ``shard`` along N of a zarr array (default encoding)."""
    return "/".join([array, "c", str(shard), *(["0"] * (ndim - 1))])


def shard_file(root: Path, array: str, shard: int, ndim: int) -> Path:
    """``shard_key`` under a local root."""
    return Path(root) / shard_key(array, shard, ndim)


def done_key(unit: Unit) -> str:
    return f"{LEDGER}/done/{unit.name}.json"


def lock_key(unit: Unit) -> str:
    return f"{LEDGER}/lock/{unit.name}.lock"


def ledger_dir(root: Path, kind: str) -> Path:
    return Path(root) / LEDGER / kind


def done_path(root: Path, unit: Unit) -> Path:
    return Path(root) / done_key(unit)


def read_manifest_attrs(backend: Backend) -> dict[str, Any] | None:
    """The raw ``attrs["fcache"]`` from the root ``zarr.json``, or None when the location holds no fcache store.

    Raises:
        StoreError: the root zarr.json is not JSON (or is nested absurdly deep).
    """
    raw = backend.get(ROOT_META)
    if raw is None:
        return None
    group = load_json(raw.decode("utf-8", errors="replace"), backend.where(ROOT_META), StoreError)
    attrs = group.get("attributes", {}) if isinstance(group, dict) else {}
    value = attrs.get(MANIFEST_ATTR) if isinstance(attrs, dict) else None
    return dict(value) if isinstance(value, Mapping) else None


def manifest_attrs(root: str | Path | Backend) -> dict[str, Any] | None:
    return read_manifest_attrs(open_backend(root))


def manifest_from_attrs(attrs: Mapping[str, Any], backend: Backend) -> Manifest:
    """The manifest of ``attrs``, checked field by field (a problem names the file and the field)."""
    return Manifest.read(dict(attrs), f"{backend.where(ROOT_META)} (the fcache manifest)")


def read_manifest(root: str | Path | Backend) -> Manifest | None:
    """The store's manifest, checked field by field; None when ``root`` holds no fcache store."""
    backend = open_backend(root)
    attrs = read_manifest_attrs(backend)
    return None if attrs is None else manifest_from_attrs(attrs, backend)


def unit_keys(manifest: Manifest, unit: Unit, targets: Mapping[str, int]) -> list[str]:
    """Every object a unit owns: feature shards, scales of the scaled forms, samples, and targets (name -> ndim)."""
    arrays: list[tuple[str, int]] = []
    for lv in manifest.levels:
        nd = 2 + len(manifest.level_shape(lv.name))
        arrays.append((f"{FEATURES}/{lv.name}", nd))
        if stored(manifest.storage.form(lv.name)).scaled:
            arrays.append((f"{SCALES}/{lv.name}", nd - 2))
    arrays += [(STATUS, 1), (GEOMETRY, 3)]
    arrays += [(f"{TARGETS}/{name}", nd) for name, nd in sorted(targets.items())]
    return [shard_key(a, unit.index, nd) for a, nd in arrays]


def read_records(backend: Backend, all_units: Sequence[Unit]) -> dict[int, LedgerRecord]:
    """The committed units' records, by unit index: one read per unit's key (no listing), concurrent on object storage.

    Raises:
        CorruptStoreError: a record that is not JSON, not a ledger record, or not the unit its key names (names the file).
    """
    out: dict[int, LedgerRecord] = {}
    keys = [done_key(u) for u in all_units]
    for unit, key, raw in zip(all_units, keys, backend.get_many(keys), strict=True):
        if raw is None:
            continue
        where = f"ledger record {backend.where(key)}"
        rec = LedgerRecord.from_dict(load_json(raw.decode("utf-8", errors="replace"), where, CorruptStoreError), where=where)
        if (rec.unit, rec.start, rec.stop) != (unit.index, unit.start, unit.stop):
            raise CorruptStoreError(f"{where}: unit {rec.unit} is not a unit of this store (samples {rec.start}-{rec.stop - 1})")
        out[rec.unit] = rec
    return out


def read_ledger(root: str | Path | Backend) -> dict[int, LedgerRecord]:
    """All committed unit records of the store at ``root``, by unit index."""
    backend = open_backend(root)
    attrs = read_manifest_attrs(backend)
    if attrs is None:
        return {}
    m = manifest_from_attrs(attrs, backend)
    return read_records(backend, units(m.dataset.n, m.storage.shard_size))


def disk_bytes(root: str | Path | Backend) -> int:
    """Bytes of the objects of a store (or below a local folder)."""
    return sum(open_backend(root).listing().values())


def temporaries(root: str | Path | Backend) -> list[Path]:
    """Leftover temporary files in a local store (from a writer that was killed)."""
    backend = open_backend(root)
    return [Path(backend.where(k)) for k in backend.temporaries()]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()
