"""``fcache recode SRC --out DST``: a store in another stored form made from an existing one, without the backbone.

DST's manifest is SRC's with its storage replaced: the same backbone, preprocessing and dataset (a head trained on one
evaluates on the other), its own store fingerprint. DST is created as extract creates a store, under a driver lease,
every array at full length and whole or not at all, its sample and target arrays copied from SRC as they are
(``fcache.store.create(template=...)``). Then each committed unit of SRC is read and decoded to float32, level by level
encoded into DST's form, and committed by ``StoreWriter.write_unit`` (one writer per shard, ledger record last) with
SRC's statuses, geometry and errors; the unit's target shards are copied byte for byte, each checked against SRC's
ledger first. Rerunning the same command recodes only the units DST's ledger lacks. The error a unit's record keeps is
measured against SRC's values; SRC's own error (its manifest's ``quantisation_error``) comes on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from fcache import __version__
from fcache.common.errors import CorruptStoreError, InputError, Interrupted, StoreError
from fcache.spec import Manifest, Status, StorageSpec
from fcache.store import layout
from fcache.store.backends import Backend, open_backend, overlapping
from fcache.store.dtypes import Encoded, encode, stored
from fcache.store.forms import MEASURE_VALUES, bases_of, check_budget, choose_forms, storage_of
from fcache.store.info import forms_text, human
from fcache.store.lease import interrupted_message, leased_store
from fcache.store.reader import FeatureStore
from fcache.store.records import LedgerRecord
from fcache.store.writer import StoreWriter, create, default_writers, leftovers_only

RECODED_FROM = "recoded_from"  # root attribute of DST: the source's location, fingerprint, storage and error


@dataclass
class RecodeSummary:
    """What a recode did. Bytes are the feature bytes (values, scales and side data) of the committed units."""

    source: str
    destination: str
    storage: dict[str, Any]  # DST's storage spec
    units_total: int
    units_committed: int  # at the source
    units_recoded: int  # by this run
    units_present: int  # already at the destination
    samples_recoded: int
    bytes_before: int
    bytes_after: int
    seconds: float
    levels: list[dict[str, Any]] = field(default_factory=list)  # per level: form, values, bytes and bits per value at each end, errors

    @property
    def ratio(self) -> float:
        """Bytes before over bytes after."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def recode(
    src: str | Path | Backend,
    dst: str | Path | Backend,
    *,
    dtype: str | None = None,
    max_error: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    hook: Callable[[str], None] | None = None,
) -> RecodeSummary:
    """Recode the committed units of ``src`` into ``dst`` (created, or resumed when it holds this recode): every level in
    the form ``dtype``, or each in the smallest form within the relative RMSE budget ``max_error``, measured on the first
    committed unit with features (as ``extract --max-error`` measures on its first unit; a resumed recode keeps DST's
    choice).

    ``progress(k, total)``: k more of the total samples to recode are committed (k = 0 first); ``hook``: called with
    each unit's stage (tests).

    Raises:
        InputError: an unknown form, or not one of ``dtype`` and ``max_error``. StoreError: ``src`` is no store;
            ``dst`` is ``src``, lies inside it (or it in ``dst``), holds other files or another store.
        CorruptStoreError: a source object fails its check.
    """
    t0 = time.perf_counter()
    if (dtype is None) == (max_error is None):
        raise InputError("give --dtype D (one form for every level) or --max-error E (each level's smallest form within E): one of them")
    if dtype is not None:
        stored(dtype)
    else:
        check_budget(float(max_error))  # type: ignore[arg-type]
    source = FeatureStore(src, storage_options=storage_options)
    target = open_backend(dst, storage_options)
    if overlapping(source.backend, target):
        raise StoreError(f"--out {target.url} and {source.url} are one location or one lies inside the other; recode into a new location")
    attrs = layout.read_manifest_attrs(target)
    existing = None if attrs is None else layout.manifest_from_attrs(attrs, target)
    storage, bases = _storage(source, existing, dtype, max_error)
    manifest = _destination_manifest(source, target, existing, storage)
    keys = [str(k) for k in source.keys]
    try:
        with leased_store(target, lambda: create(target, manifest, keys, bases=bases, template=source.backend)) as (writer, existed):
            if existed:
                writer.tidy()  # a resumed recode: what its killed writers left
            present = set(writer.committed())
            todo = [source.units[u] for u in sorted(source.ledger) if u not in present]
            _run(source, writer, todo, workers or default_writers(), progress, hook)
            stats = writer.finalize()
            _note_source(writer, source)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(target)) from None
    return _summary(source, writer, stats, todo, len(present & set(source.ledger)), time.perf_counter() - t0)


def _storage(source: FeatureStore, existing: Manifest | None, dtype: str | None,
             max_error: float | None) -> tuple[StorageSpec, dict[str, np.ndarray]]:  # fmt: skip
    """DST's storage (SRC's codec and shard size; the form ``dtype``, or the forms chosen for ``max_error``) and the
    bases of its levels in projected forms, fitted on SRC's first committed unit. DST being resumed (``existing``)
    keeps the choice it recorded for the same budget, and its bases."""
    base = StorageSpec(codec=source.manifest.storage.codec, shard_size=source.manifest.storage.shard_size)
    if dtype is not None:
        storage = dataclasses.replace(base, dtype=dtype)
        if existing is not None or not stored(dtype).fitted:
            return storage, {}
        return storage, {name: basis for name, x in measured_maps(source).items() if (basis := stored(dtype).fit(x)) is not None}
    assert max_error is not None
    if existing is not None and existing.storage.max_error == max_error:
        return existing.storage, {}
    m = source.manifest
    values = {lv.name: m.dataset.n * m.num_views * math.prod(m.level_shape(lv.name)) for lv in m.levels}
    choices = choose_forms(measured_maps(source), max_error, base.codec, store_values=values)
    return storage_of(choices, base, max_error), bases_of(choices)


def measured_maps(source: FeatureStore, max_values: int = MEASURE_VALUES) -> dict[str, np.ndarray]:
    """Float32 maps (k, C, H, W) per level of the first committed unit that has samples with features: its sample-views'
    (and frames') maps, evenly spaced, at most about ``max_values`` values per level."""
    for u, rec in sorted(source.ledger.items()):
        ok = [j for j, s in enumerate(rec.status) if Status(s).has_features]
        if not ok:
            continue
        out = {}
        for lv in source.levels:
            x = source.read_unit(lv.name, source.units[u])[ok]
            maps = x.reshape(-1, *x.shape[-3:])  # (k, C, H, W)
            out[lv.name] = maps[:: max(1, math.ceil(maps.size / max_values))]
        return out
    raise InputError(f"{source.url} has no committed sample with features to measure the forms on; give --dtype instead")


def _destination_manifest(source: FeatureStore, target: Backend, have: Manifest | None, storage: StorageSpec) -> Manifest:
    """SRC's manifest with ``storage``; the one DST already holds (``have``) when it is this recode (resumed); else
    StoreError."""
    want = dataclasses.replace(source.manifest, storage=storage, fcache_version=__version__)
    if have is None:
        if not target.is_empty() and not (target.remote and leftovers_only(target)):
            raise StoreError(f"--out {target.url} exists and is not an fcache store; recode into a new location")
        return want
    if have.fingerprint != want.fingerprint:
        diffs = "; ".join(have.differences(want))
        raise StoreError(
            f"--out {target.url} holds another store ({diffs}; there != asked); recode into a new location, "
            "or rerun the command that made it to finish it"
        )
    return have


def _run(source: FeatureStore, writer: StoreWriter, todo: list[layout.Unit], workers: int,
         progress: Callable[[int, int], None] | None, hook: Callable[[str], None] | None) -> None:  # fmt: skip
    """Each unit of ``todo`` recoded and committed, ``workers`` at a time (each unit owns its shards)."""
    total = sum(len(u) for u in todo)
    report = progress or (lambda k, total: None)
    report(0, total)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fcache-recode")
    try:
        for unit in pool.map(lambda u: _recode_unit(source, writer, u, source.ledger[u.index], hook), todo):
            report(len(unit), total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _recode_unit(source: FeatureStore, writer: StoreWriter, unit: layout.Unit, rec: LedgerRecord,
                 hook: Callable[[str], None] | None) -> layout.Unit:  # fmt: skip
    """One unit: its levels decoded and encoded one at a time (one level's float32 in memory), its targets copied."""
    storage, bases = writer.manifest.storage, writer.bases
    features: dict[str, Encoded] = {lv.name: encode(source.read_unit(lv.name, unit), storage.form(lv.name), lv.name, bases.get(lv.name))
                                    for lv in source.levels}  # fmt: skip
    geometry = np.asarray(source.array(layout.GEOMETRY)[unit.start : unit.stop], dtype=np.float32)
    status = np.asarray(rec.status, dtype=np.uint8)
    copied = _target_shards(source, writer, unit, rec)
    writer.write_unit(unit, features, status, geometry, errors=rec.errors, copied=copied, hook=hook)
    return unit


def _target_shards(source: FeatureStore, writer: StoreWriter, unit: layout.Unit, rec: LedgerRecord) -> dict[str, bytes]:
    """The unit's target shards as SRC holds them, each with the sha256 SRC's ledger record gives it."""
    want = {k: rec.files[k] for k in writer.unit_keys(unit) if k.startswith(f"{layout.TARGETS}/") and k in rec.files}
    out = {}
    for key, data in zip(want, source.backend.get_many(list(want)), strict=True):
        if data is None or hashlib.sha256(data).hexdigest() != want[key].sha256:
            what = "is missing" if data is None else "differs from its ledger record"
            raise CorruptStoreError(
                f"{source.backend.where(key)} {what} (samples {unit.start}-{unit.stop - 1}); run `fcache verify {source.url}` "
                "and re-extract that unit before recoding"
            )
        out[key] = data
    return out


def _note_source(writer: StoreWriter, source: FeatureStore) -> None:
    """DST's root attributes say where its values came from (provenance beside the manifest, not fingerprinted)."""
    attrs = layout.read_manifest_attrs(writer.backend) or {}
    group = zarr.open_group(writer.backend.zarr_store(read_only=False), mode="r+", zarr_format=3)
    note: dict[str, Any] = {
        "store": source.url,
        "fingerprint": source.manifest.fingerprint,
        "storage": source.manifest.storage.to_dict(),
        "quantisation_error": source.quantisation_error,
    }
    group.attrs[layout.MANIFEST_ATTR] = {**attrs, RECODED_FROM: note}


def _summary(source: FeatureStore, writer: StoreWriter, stats: Mapping[str, Any], todo: list[layout.Unit], present: int,
             seconds: float) -> RecodeSummary:  # fmt: skip
    before, after = feature_bytes(source), feature_bytes(FeatureStore(writer.backend))
    m = writer.manifest
    values = {lv.name: sum(r.samples for r in source.ledger.values()) * m.num_views * math.prod(m.level_shape(lv.name)) for lv in m.levels}
    levels = [
        {
            "name": lv.name,
            "form": m.storage.form(lv.name),
            "values": values[lv.name],
            "bytes_before": before[lv.name],
            "bytes_after": after[lv.name],
            "bits_before": 8 * before[lv.name] / values[lv.name] if values[lv.name] else 0.0,
            "bits_after": 8 * after[lv.name] / values[lv.name] if values[lv.name] else 0.0,
            "rel_rmse": stats["quantisation_error"].get(lv.name),  # against the source's values
            "source_rel_rmse": source.quantisation_error.get(lv.name),
        }
        for lv in m.levels
    ]
    return RecodeSummary(
        source=source.url,
        destination=writer.backend.url,
        storage=m.storage.to_dict(),
        units_total=len(source.units),
        units_committed=len(source.ledger),
        units_recoded=len(todo),
        units_present=present,
        samples_recoded=sum(len(u) for u in todo),
        bytes_before=sum(before.values()),
        bytes_after=sum(after.values()),
        seconds=round(seconds, 3),
        levels=levels,
    )


def feature_bytes(store: FeatureStore) -> dict[str, int]:
    """Per level: the bytes of the committed units' feature shards and scales (their ledger records' sizes), and of the
    level's basis (a projected form's side data, one per store)."""
    out = {lv.name: sum(store.backend.listing(f"{layout.BASIS}/{lv.name}").values()) for lv in store.levels}
    for rec in store.ledger.values():
        for key, f in rec.files.items():
            top, _, rest = key.partition("/")
            if top in (layout.FEATURES, layout.SCALES):
                out[rest.partition("/")[0]] += f.size
    return out


def format_summary(s: RecodeSummary) -> str:
    """The summary as lines: units and bytes, then per level the bits per value and the error."""
    lines = [
        f"recoded {s.units_recoded} units ({s.samples_recoded} samples) of {s.source} into {s.destination} "
        f"({forms_text(s.storage, [lv['name'] for lv in s.levels])}); {s.units_present} were there already",
        f"features: {human(s.bytes_before)} -> {human(s.bytes_after)}, ratio {s.ratio:.2f}",
    ]
    for lv in s.levels:
        err = "-" if lv["rel_rmse"] is None else f"{lv['rel_rmse']:.2e}"
        own = "" if lv["source_rel_rmse"] is None else f" (the source's own: {lv['source_rel_rmse']:.2e})"
        lines.append(
            f"  {lv['name']} {lv['form']}: {lv['bits_before']:.2f} -> {lv['bits_after']:.2f} bits per value, relative RMSE {err}{own}"
        )
    if s.units_committed < s.units_total:
        lines.append(
            f"the source has {s.units_committed} of {s.units_total} units committed: finish it, then rerun this command for the rest"
        )
    return "\n".join(lines)
