"""``fcache copy SRC DST``: a store from local disk to object storage, back, or between buckets, checked and resumable.

The destination is made the way ``create`` makes a store (whole or not at all: a renamed folder, or the manifest
created last in object storage) from the source's metadata: array definitions, sample keys and the driver's targets.
Then each committed unit is copied object by object: every object read from the source must have the sha256 its
ledger record holds (a damaged source stops the copy and is named), is written to the destination and read back
there, checked against the same sha256, and only then is the unit's ledger record created at the destination.
So the destination's ledger is the truth, as for an extraction: rerunning the command copies only what is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fcache.common.errors import CorruptStoreError, StoreError
from fcache.common.files import check_writable
from fcache.spec import Manifest
from fcache.store import layout
from fcache.store.backends import ROOT_META, Backend, open_backend, overlapping
from fcache.store.records import LedgerRecord

UNIT_KEYED = (layout.FEATURES, layout.SCALES, layout.STATUS, layout.GEOMETRY)  # written by units (targets may be the driver's)


@dataclass
class CopySummary:
    source: str
    destination: str
    units_total: int
    units_committed: int  # at the source
    units_copied: int  # by this run
    units_present: int  # already at the destination
    bytes_copied: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def copy_store(
    src: str | Path | Backend,
    dst: str | Path | Backend,
    *,
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> CopySummary:
    """Copy the committed units of ``src`` into ``dst`` (created, or resumed if it holds the same store).

    Raises:
        StoreError: ``dst`` holds another store or other data; CorruptStoreError: a source object fails its checksum.
    """
    source, target = open_backend(src, storage_options), open_backend(dst, storage_options)
    if overlapping(source, target):
        raise StoreError(
            f"{target.url} and {source.url} are one location or one lies inside the other; copy into a location outside the store"
        )
    if not target.remote:
        check_writable(target.root, "DST")
    attrs = layout.read_manifest_attrs(source)
    if attrs is None:
        raise StoreError(f"{source.url} is not an fcache store (no zarr.json with an fcache manifest); check the path")
    manifest = layout.manifest_from_attrs(attrs, source)
    units = layout.units(manifest.dataset.n, manifest.storage.shard_size)
    ledger = layout.read_records(source, units)
    _prepare_destination(source, target, manifest, ledger)
    present = set(layout.read_records(target, units))
    todo = [units[u] for u in sorted(ledger) if u not in present]
    copied = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for n in pool.map(lambda unit: _copy_unit(source, target, unit, ledger[unit.index]), todo):
            copied += n
            if progress:
                progress(1)
    for key in (layout.ERRORS, ROOT_META):  # the statistics finalize() wrote; the manifest stays the same store
        data = source.get(key)
        if data is not None:
            target.put(key, data)
    return CopySummary(source.url, target.url, len(units), len(ledger), len(todo), len(present & set(ledger)), copied)


def _prepare_destination(source: Backend, target: Backend, manifest: Manifest, ledger: Mapping[int, LedgerRecord]) -> None:
    """Create the destination from the source's metadata, or check that it holds the same store."""
    existing = layout.read_manifest_attrs(target)
    if existing is not None:
        other = layout.manifest_from_attrs(existing, target)
        if other.fingerprint != manifest.fingerprint:
            diffs = "; ".join(other.differences(manifest))
            raise StoreError(f"{target.url} holds another store ({diffs}); copy into a new location")
        return
    if not target.is_empty():
        raise StoreError(f"{target.url} exists and is not an fcache store; copy into a new location")
    listing = source.listing()
    unit_owned = {k for rec in ledger.values() for k in rec.files}
    keep = sorted(
        k
        for k in listing
        if k not in unit_owned
        and k != ROOT_META
        and k.split("/", 1)[0] not in (layout.LEDGER, layout.ERRORS)
        and not (k.startswith(UNIT_KEYED) and "/c/" in k)  # uncommitted units' shards: not part of the store yet
        and not k.endswith(layout.TEMP_SUFFIX)
    )
    root_meta = source.get(ROOT_META)
    assert root_meta is not None

    def build(store: Any) -> None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buf = default_buffer_prototype().buffer
        for key, data in zip(keep, source.get_many(keep), strict=True):
            if data is not None:
                sync(store.set(key, buf.from_bytes(data)))
        sync(store.set(ROOT_META, buf.from_bytes(root_meta)))  # last

    target.new_store(build)


def _copy_unit(source: Backend, target: Backend, unit: layout.Unit, record: LedgerRecord) -> int:
    """Copy one unit's objects, each checked at both ends, then create its ledger record at the destination."""
    size = 0
    for key, want in sorted(record.files.items()):
        data = source.get(key)
        if data is None or hashlib.sha256(data).hexdigest() != want.sha256:
            what = "is missing" if data is None else "differs from its ledger record"
            raise CorruptStoreError(
                f"{source.where(key)} {what} (samples {unit.start}-{unit.stop - 1}); run `fcache verify {source.url}` "
                "and re-extract that unit before copying"
            )
        target.put(key, data)
        back = target.get(key)
        if back is None or hashlib.sha256(back).hexdigest() != want.sha256:
            raise CorruptStoreError(f"{target.where(key)} does not read back as written; check the destination and rerun")
        size += len(data)
    raw = source.get(layout.done_key(unit))
    assert raw is not None
    target.create(layout.done_key(unit), raw)
    return size
