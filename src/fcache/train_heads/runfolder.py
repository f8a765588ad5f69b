"""A RUN folder: its record (``config.json``), checkpoints and weights, metrics and evaluations.

- ``config.json``: the :class:`~fcache.train_heads.runrecord.TrainingRecord`. A folder holding another configuration
  (or the same one without ``--resume``) is refused before anything is written.
- ``checkpoint-<iteration>.pt``, ``model.safetensors``, ``best.safetensors``: ``checkpoints.py``.
- ``metrics.jsonl`` and ``metrics.csv``: ``metricslog.py``.
- ``eval/<store>/``: what ``fcache eval`` wrote for one evaluation store (its prediction files, ``metrics.json`` and
  ``store.json`` naming the store), one folder per store, so no evaluation overwrites another's.
- ``train.lease``: held by the process training into the folder (``runlease.py``).

Files are written atomically (a temporary file renamed into place) and readable as the umask allows, like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fcache.common.errors import InputError
from fcache.common.files import remove_stale, write_json
from fcache.common.records import read_json
from fcache.train_heads.checkpoints import BEST, MODEL, OLD_CHECKPOINT, Checkpoints
from fcache.train_heads.metricslog import METRICS, METRICS_CSV, MetricsLog
from fcache.train_heads.runlease import LEASE
from fcache.train_heads.runrecord import EvalStore, TrainingRecord

CONFIG = "config.json"
EVAL, EVAL_METRICS, EVAL_STORE = "eval", "metrics.json", "store.json"


class RunDir(Checkpoints, MetricsLog):
    """Paths and files of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read_config(self) -> TrainingRecord | None:
        """The run's record, migrated and checked field by field (InputError naming the file and the field); None without one."""
        p = self.path / CONFIG
        if not p.is_file():
            return None
        return TrainingRecord.from_dict(read_json(p, InputError), str(p))

    def require_config(self) -> TrainingRecord:
        record = self.read_config()
        if record is None:
            raise InputError(f"{self.path} is not an fcache run folder (no {CONFIG}); pass the --out folder of `fcache train-head`")
        return record

    def check(self, record: TrainingRecord, *, resume: bool) -> dict[str, Any] | None:
        """What :meth:`begin` would do, without writing anything: the checkpoint to resume from, if any.

        Raises:
            InputError: the folder holds something else, another configuration, or this run without ``resume``.
        """
        existing = self.read_config()
        if existing is None:
            if self.path.exists() and any(p.name != LEASE for p in self.path.iterdir()):  # a lease alone: a run starting
                raise InputError(f"{self.path} exists and is not an fcache run folder; choose another --out")
            return None
        diffs = _diff(existing.identity(), record.identity())
        if diffs:
            raise InputError(
                f"{self.path} holds a run of another configuration ({'; '.join(diffs)}); choose another --out, "
                "or repeat the original flags to resume it"
            )
        checkpoint = self.load_checkpoint()
        if not resume:
            at = f"at iteration {checkpoint['iteration']}" if checkpoint else "without a checkpoint"
            raise InputError(f"{self.path} already holds this run ({at}); pass --resume to continue it, or choose another --out")
        return checkpoint

    def begin(self, record: TrainingRecord, *, resume: bool) -> dict[str, Any] | None:
        """Claim the folder for the run ``record`` describes; returns the checkpoint to resume from, if any.

        Raises:
            InputError: as :meth:`check`, before anything is written.
        """
        existing = self.read_config()
        checkpoint = self.check(record, resume=resume)
        if existing is None:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / CONFIG, record.to_dict())
            return None
        stale = ("checkpoint-*.pt", OLD_CHECKPOINT, MODEL, BEST, CONFIG, METRICS, METRICS_CSV)
        remove_stale(self.path, stale)  # a killed run's temporaries
        if existing.features is None and record.features is not None:  # a run from before backbones were recorded
            write_json(self.path / CONFIG, record.to_dict())
        self.truncate_metrics(checkpoint["iteration"] if checkpoint else 0)
        return checkpoint

    # -- evaluations ---------------------------------------------------------------------------
    def eval_dir(self, store_path: str | Path, fingerprint: str) -> Path:
        """``RUN/eval/<store name>``, created, for the store at ``store_path``: the same folder every time that store is
        evaluated, another one (``<name>-<fingerprint[:8]>``) for another store of the same name."""
        name = Path(str(store_path).rstrip("/")).name.removesuffix(".zarr") or "store"
        for candidate in (name, f"{name}-{fingerprint[:8]}"):
            d = self.path / EVAL / candidate
            known = d / EVAL_STORE
            if known.is_file() and EvalStore.from_dict(read_json(known, InputError), str(known)).fingerprint != fingerprint:
                continue
            d.mkdir(parents=True, exist_ok=True)
            write_json(known, EvalStore(str(Path(store_path).absolute()), fingerprint).to_dict())
            return d
        raise AssertionError("a fingerprint-named folder holds its own store")


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {json.dumps(a.get(k))} != {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
