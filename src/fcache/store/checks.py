"""``fcache verify``: is every committed byte of a store what the ledger says it is?

Checks (design, "Commit protocol"): no temporary files or dead writers' locks left; every unit
committed; each committed unit's files present with the recorded size (and, unless fast, sha256);
statuses equal to the ledger's; every chunk decodes with a valid CRC32C and holds no NaN/Inf.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcache.spec import Status
from fcache.store import layout
from fcache.store.backends import Backend
from fcache.store.consistency import manifest_problems
from fcache.store.dtypes import decode, stored
from fcache.store.reader import FeatureStore
from fcache.store.records import LedgerRecord


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with where it is."""

    kind: str  # temporary | lock | incomplete | missing | unexpected | size | checksum | decode | nonfinite | status | manifest
    path: str
    message: str
    samples: tuple[int, int] | None = None  # first, last sample index affected

    def line(self) -> str:
        where = f" (samples {self.samples[0]}-{self.samples[1]})" if self.samples else ""
        return f"{self.kind.upper():10s} {self.path}{where}: {self.message}"


@dataclass
class VerifyReport:
    store: str
    fast: bool
    units_total: int = 0
    units_committed: int = 0
    files_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify(
    path: str | Path | Backend,
    *,
    fast: bool = False,
    sample: float = 1.0,
    progress: Callable[[int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check a store (a path or URL); ``progress`` is called with 1 after each committed unit checked.

    ``sample`` < 1 checks the files of that fraction of the committed units (at least one, drawn with a fixed seed);
    everything else (temporaries, locks, uncommitted units) is checked whole.
    """
    store = FeatureStore(path, storage_options=storage_options, check=False)
    backend = store.backend
    inconsistent = manifest_problems(backend, store.manifest)
    if inconsistent:  # the units cannot be read as the manifest says
        return VerifyReport(str(store.root), fast, problems=[Problem("manifest", what, problem) for what, problem in inconsistent])
    report = VerifyReport(store=str(store.root), fast=fast, units_total=len(store.units), units_committed=len(store.ledger))
    for tmp in backend.temporaries():
        report.problems.append(Problem("temporary", tmp, "leftover temporary file from an interrupted write"))
    for lock in sorted(k for k in backend.listing(f"{layout.LEDGER}/lock") if k.endswith(".lock")):
        report.problems.append(Problem("lock", lock, "a writer stopped while holding this unit's lock"))
    for unit in store.units:
        if unit.index not in store.ledger:
            report.problems.append(
                Problem(
                    "incomplete",
                    f"unit {unit.name}",
                    "not committed; rerun the same extract command to finish",
                    (unit.start, unit.stop - 1),
                )
            )
    targets = {name: store.array(f"{layout.TARGETS}/{name}").ndim for name in store.target_names}
    checked = _sampled(store.ledger, sample)
    raw_status = np.asarray(store.array(layout.STATUS)[:], dtype=np.uint8) if len(checked) == len(store.ledger) else None
    for u, rec in sorted(checked.items()):
        unit = store.units[u]
        report.problems += _check_unit(store, unit, rec, targets, raw_status, fast, report)
        if progress:
            progress(1)
    return report


def _sampled(ledger: dict[int, LedgerRecord], fraction: float) -> dict[int, LedgerRecord]:
    if fraction >= 1 or not ledger:
        return ledger
    k = max(1, math.ceil(fraction * len(ledger)))
    chosen = np.random.default_rng(0).choice(sorted(ledger), size=k, replace=False)
    return {int(u): ledger[int(u)] for u in chosen}


def _check_unit(
    store: FeatureStore,
    unit: layout.Unit,
    rec: LedgerRecord,
    targets: dict[str, int],
    raw_status: np.ndarray | None,
    fast: bool,
    report: VerifyReport,
) -> list[Problem]:
    backend, span = store.backend, (unit.start, unit.stop - 1)
    problems: list[Problem] = []
    files = rec.files
    bad_files: set[str] = set()
    with_features = any(Status(s).has_features for s in rec.status)
    keys = layout.unit_keys(store.manifest, unit, targets)
    for rel, size in zip(keys, backend.sizes(keys), strict=True):
        want = files.get(rel)
        report.files_checked += 1
        if want is None:  # the unit wrote no such file (zarr writes no shard that holds only fill values)
            if size is not None:
                problems.append(
                    Problem("unexpected", rel, "a file the unit's ledger record does not list (written after the commit?)", span)
                )
            elif with_features and rel.startswith((layout.FEATURES, layout.SCALES)):
                problems.append(Problem("missing", rel, "the unit has samples with features but the ledger lists no shard here", span))
            else:
                continue
        elif size is None:
            problems.append(Problem("missing", rel, "file is missing", span))
        elif size != want.size:
            problems.append(Problem("size", rel, f"{size} bytes, the ledger recorded {want.size} (truncated or rewritten)", span))
        elif not fast and _sha256(backend, rel) != want.sha256:
            problems.append(Problem("checksum", rel, "content differs from what was committed", span))
            continue  # still decoded below, to say whether the damage reaches the values
        else:
            continue
        bad_files.add(rel)
    status = raw_status[unit.start : unit.stop] if raw_status is not None else store.array(layout.STATUS)[unit.start : unit.stop]
    if not np.array_equal(np.asarray(status, dtype=np.uint8), np.asarray(rec.status, dtype=np.uint8)):
        problems.append(Problem("status", layout.STATUS, "statuses differ from the unit's ledger record", span))
    if fast:
        return problems
    for lv in store.levels:
        name = f"{layout.FEATURES}/{lv.name}"
        shard = layout.shard_key(name, unit.index, 2 + len(store.manifest.level_shape(lv.name)))
        if shard in bad_files:
            continue  # already named; decoding a missing or cut file would only read fill values
        problems += _decode_level(store, lv.name, unit, shard, span)
    return problems


def _decode_level(store: FeatureStore, level: str, unit: layout.Unit, shard: str, span: tuple[int, int]) -> list[Problem]:
    form = store.manifest.storage.form(level)
    try:
        values = np.asarray(store.array(f"{layout.FEATURES}/{level}")[unit.start : unit.stop])
        scales = np.asarray(store.array(f"{layout.SCALES}/{level}")[unit.start : unit.stop]) if stored(form).scaled else None
    except (ValueError, RuntimeError) as e:
        return [Problem("decode", shard, f"does not decode ({e})", span)]
    x = decode(values, form, scales, store.width(level), store.bases.get(level))
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad) + unit.start
        return [Problem("nonfinite", shard, f"NaN/Inf in samples {', '.join(map(str, idx))}", (int(idx[0]), int(idx[-1])))]
    return []


def _sha256(backend: Backend, key: str) -> str | None:
    data = backend.get(key)
    return None if data is None else hashlib.sha256(data).hexdigest()
