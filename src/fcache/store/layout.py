"""Where things live inside a store directory, and the unit/shard arithmetic shared by writer and reader.

A unit of work is one shard along N (samples ``[u*S, min((u+1)*S, N))``); its ledger record is
``ledger/done/<unit>.json``. zarr's LocalStore writes every file through ``*.partial`` temporaries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcache.common.errors import CorruptStoreError, StoreError
from fcache.common.records import read_json
from fcache.spec import Manifest
from fcache.store.dtypes import stored
from fcache.store.records import LedgerRecord

MANIFEST_ATTR = "fcache"
FEATURES = "features"
SCALES = "scales"
KEYS = "samples/key"
STATUS = "samples/status"
GEOMETRY = "samples/geometry"
TARGETS = "targets"
LEDGER = "ledger"
ERRORS = "errors.jsonl"
TEMP_SUFFIX = ".partial"
STORE_ENTRIES = ("zarr.json", FEATURES, SCALES, "samples", TARGETS, LEDGER, ERRORS)  # what a store folder holds at its top


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


def feature_dims(level: str, ndim: int) -> tuple[str, ...]:
    """zarr ``dimension_names`` of ``features/<level>`` for a level of ``ndim`` dims after (sample, view): (C, H, W) or
    video (T, C, H, W). Channel and spatial names carry the level (their sizes differ between levels), so that
    ``xarray.open_zarr(store, group="features")`` opens every level as one dataset."""
    return ("sample", "view", *(["time"] if ndim == 4 else []), f"channel_{level}", f"y_{level}", f"x_{level}")


def units(n: int, shard_size: int) -> list[Unit]:
    return [Unit(u, s, min(s + shard_size, n)) for u, s in enumerate(range(0, n, shard_size))]


def unit_of(i: int, shard_size: int, n: int) -> Unit:
    start = (i // shard_size) * shard_size
    return Unit(i // shard_size, start, min(start + shard_size, n))


def shard_file(root: Path, array: str, shard: int, ndim: int) -> Path:
    """Path of the shard (or chunk) file holding ``shard`` along N of a zarr array (default encoding)."""
    return root.joinpath(array, "c", str(shard), *(["0"] * (ndim - 1)))


def manifest_attrs(root: Path) -> dict[str, Any] | None:
    """The raw ``attrs["fcache"]`` of a store, or None when ``root`` is not an fcache store.

    Raises:
        StoreError: the group's zarr.json is not JSON (or is nested absurdly deep).
    """
    path = root / "zarr.json"
    if not path.is_file():
        return None
    group = read_json(path, StoreError)
    attrs = group.get("attributes", {}) if isinstance(group, dict) else {}
    value = attrs.get(MANIFEST_ATTR) if isinstance(attrs, dict) else None
    return dict(value) if isinstance(value, Mapping) else None


def read_manifest(root: Path) -> Manifest | None:
    """The store's manifest, checked field by field; None when ``root`` is not an fcache store."""
    attrs = manifest_attrs(root)
    return None if attrs is None else Manifest.read(attrs, f"{root / 'zarr.json'} (the fcache manifest)")


def unit_files(root: Path, manifest: Manifest, unit: Unit, targets: Mapping[str, int]) -> list[Path]:
    """Every file a unit owns: feature shards, int8 scales, samples, and targets (name -> ndim)."""
    arrays: list[tuple[str, int]] = []
    for lv in manifest.levels:
        nd = 2 + len(manifest.level_shape(lv.name))
        arrays.append((f"{FEATURES}/{lv.name}", nd))
        if stored(manifest.storage.dtype).scaled:
            arrays.append((f"{SCALES}/{lv.name}", nd - 2))
    arrays += [(STATUS, 1), (GEOMETRY, 3)]
    arrays += [(f"{TARGETS}/{name}", nd) for name, nd in sorted(targets.items())]
    return [shard_file(root, a, unit.index, nd) for a, nd in arrays]


def ledger_dir(root: Path, kind: str) -> Path:
    return root / LEDGER / kind


def done_path(root: Path, unit: Unit) -> Path:
    return ledger_dir(root, "done") / f"{unit.name}.json"


def read_ledger(root: Path, expected: list[Unit] | None = None) -> dict[int, LedgerRecord]:
    """All committed unit records, by unit index; with ``expected``, each must be one of those units (same range).

    Raises:
        CorruptStoreError: a record that is not JSON, not a ledger record, or not a unit of this store (names the file).
    """
    out: dict[int, LedgerRecord] = {}
    d = ledger_dir(root, "done")
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        rec = LedgerRecord.from_dict(read_json(p, CorruptStoreError), where=f"ledger record {p}")
        if expected is not None and not (
            0 <= rec.unit < len(expected) and (rec.start, rec.stop) == (expected[rec.unit].start, expected[rec.unit].stop)
        ):
            raise CorruptStoreError(f"ledger record {p}: unit {rec.unit} is not a unit of this store (samples {rec.start}-{rec.stop - 1})")
        out[rec.unit] = rec
    return out


def temporaries(root: Path) -> list[Path]:
    """Leftover temporary files anywhere in the store (from a writer that was killed)."""
    return sorted(Path(e.path) for e in files_under(root) if e.name.endswith(TEMP_SUFFIX))


def files_under(root: Path) -> Iterator[os.DirEntry]:
    """Every file below ``root`` (symbolic links not followed): one ``scandir`` per folder, no path objects per file."""
    folders = [str(root)] if root.is_dir() else []
    while folders:
        with os.scandir(folders.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    folders.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    yield e


def disk_bytes(root: Path) -> int:
    """Bytes of the files below ``root``."""
    return sum(e.stat(follow_symlinks=False).st_size for e in files_under(root))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any, exclusive: bool = False) -> bool:
    """Write JSON through a temporary file; with ``exclusive`` the first writer wins (returns False after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
