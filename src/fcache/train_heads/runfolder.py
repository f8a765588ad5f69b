"""A RUN folder: config.json (the :class:`TrainingRecord`), checkpoints, the model weights and the metrics.

- ``config.json``: the TrainConfig, the store fingerprint, the task description (head spec, class or category names
  and ids), the levels and the trainable parameter count; and everything that rebuilds the frozen backbone and its
  inputs without the store (the training store's backbone, preprocessing and dataset records), the fcache and library
  versions, the command line and the host. A folder holding another configuration (or the same one without
  ``--resume``) is refused before anything is written.
- ``checkpoint-<iteration>.pt``: model, optimiser, schedule, RNG states (and the EMA, gradient scaler and evaluation
  state when the run has them) at an iteration; the newest ``--keep-last`` are kept; loaded with
  ``torch.load(weights_only=True)``, never by unpickling. Runs of earlier fcache versions have one ``checkpoint.pt``.
- ``model.safetensors``: the weights of the newest checkpoint (the EMA weights with ``--ema``): what ``fcache eval``
  loads, with the record as metadata (``fcache.run``), so the file alone says what it is.
- ``best.safetensors``: the same for the evaluation with the best main metric (metadata: its iteration and value).
- ``metrics.jsonl``: one JSON object per logged iteration or evaluation; ``metrics.csv`` the same records as a table.
- ``eval/<store>/``: what ``fcache eval`` wrote for one evaluation store (its prediction files, ``metrics.json`` and
  ``store.json`` naming the store), one folder per store, so no evaluation overwrites another's.

Files are written atomically (a temporary file renamed into place) and readable as the umask allows, like any other.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import json
import os
import platform
import re
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fcache._version import __version__
from fcache.common.errors import InputError
from fcache.common.files import atomic_file, remove_stale, write_json
from fcache.common.records import check_record, load_json, read_json
from fcache.spec import BackboneInfo, DatasetInfo, LevelSpec, Manifest, Preprocessing, library_versions
from fcache.train_heads.config import TrainConfig

RUN_FORMAT = 1
CONFIG, MODEL, BEST, METRICS, METRICS_CSV = "config.json", "model.safetensors", "best.safetensors", "metrics.jsonl", "metrics.csv"
CHECKPOINT = "checkpoint-{iteration}.pt"
OLD_CHECKPOINT = "checkpoint.pt"  # the one checkpoint of a run written before checkpoints were numbered
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")
EVAL, EVAL_METRICS, EVAL_STORE = "eval", "metrics.json", "store.json"
RANDOM_INIT = "random-init"  # BackboneInfo.weights of a random backbone: its weights are made from the extraction seed
RECORD_KEY = "fcache.run"  # model.safetensors metadata: the TrainingRecord as JSON


def backbone_identity(backbone: BackboneInfo, pre: Preprocessing) -> dict[str, Any]:
    """What makes two feature sources the same frozen model seeing the same inputs: the model, its weights, input size,
    window and normalisation (and, for random-init weights, the seed they were drawn from). Views are not part of it:
    a validation store has other views than the training store. The levels are compared one by one
    (:func:`identity_differences`)."""
    return {
        "model": backbone.timm_name,
        "weights": backbone.weights,
        "input_size": backbone.input_size,
        "window": backbone.window,
        "mean": [round(float(v), 6) for v in pre.mean],
        "std": [round(float(v), 6) for v in pre.std],
        "resize": pre.resize,
        "seed": pre.seed if backbone.weights == RANDOM_INIT else None,
    }


def identity_differences(
    have: tuple[BackboneInfo, Preprocessing], want: tuple[BackboneInfo, Preprocessing], levels: tuple[LevelSpec, ...]
) -> list[str]:
    """``field: have != want`` for every field of :func:`backbone_identity` (and every level in ``levels``) that differs."""
    a, b = backbone_identity(*have), backbone_identity(*want)
    out = [f"{k}: {json.dumps(a[k])} != {json.dumps(b[k])}" for k in a if a[k] != b[k]]
    theirs = {lv.name: lv for lv in have[0].levels}
    for lv in levels:
        other = theirs.get(lv.name)
        if other is not None and other != lv:
            out.append(f"{lv.name}: {other.channels}ch/{other.stride} != {lv.channels}ch/{lv.stride}")
    return out


@dataclass(frozen=True)
class FeatureSource:
    """The training store's frozen backbone, how its samples became backbone inputs, and its dataset: everything that
    rebuilds the backbone and its preprocessing without the store (``fcache predict``, ``fcache.load``, ``fcache export``)."""

    backbone: BackboneInfo
    preprocessing: Preprocessing
    dataset: DatasetInfo

    @classmethod
    def of(cls, manifest: Manifest) -> FeatureSource:
        return cls(manifest.backbone, manifest.preprocessing, manifest.dataset)

    @property
    def identity(self) -> dict[str, Any]:
        return backbone_identity(self.backbone, self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.to_dict(), "preprocessing": self.preprocessing.to_dict(), "dataset": self.dataset.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> FeatureSource:
        if not isinstance(d, dict) or not {"backbone", "preprocessing", "dataset"} <= set(d):
            raise ValueError("features must be an object with backbone, preprocessing and dataset")
        return cls(BackboneInfo.from_dict(d["backbone"]), Preprocessing.from_dict(d["preprocessing"]), DatasetInfo.from_dict(d["dataset"]))


@dataclass(frozen=True)
class TrainingRecord:
    """What RUN/config.json holds: the identity of the run (its config, already resolved, and the store's fingerprint),
    what it trains (the task's description, which rebuilds the head without the store, and the levels it reads) and
    where its features came from (``features``: None in runs written before fcache recorded it), with provenance."""

    config: TrainConfig
    store_fingerprint: str
    task: dict[str, Any]
    levels: tuple[LevelSpec, ...]
    trainable_params: int
    train_samples: int
    features: FeatureSource | None = None
    command: tuple[str, ...] = ()
    libraries: dict[str, str] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    format_version: int = RUN_FORMAT
    fcache_version: str = field(default=__version__)

    @classmethod
    def new(
        cls, config: TrainConfig, manifest: Manifest, task: dict[str, Any], levels: tuple[LevelSpec, ...], params: int, samples: int
    ) -> TrainingRecord:
        """The record of a run starting now on a store of ``manifest``, with this process's command line, libraries and host."""
        libraries = library_versions()
        for name in ("torchvision", "safetensors", "pycocotools", "tensorboard", "wandb"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                libraries[name] = importlib.metadata.version(name)
        return cls(config, manifest.fingerprint, task, levels, params, samples, FeatureSource.of(manifest), tuple(sys.argv), libraries,
                   host_info())  # fmt: skip

    @property
    def head(self) -> str:
        """The head spec as the task writes it canonically (every parameter, sorted)."""
        return str(self.task.get("head", self.config.head))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format_version": self.format_version,
            "fcache_version": self.fcache_version,
            "config": self.config.to_dict(),
            "store_fingerprint": self.store_fingerprint,
            "task": dict(self.task),
            "levels": [lv.to_dict() for lv in self.levels],
            "trainable_params": self.trainable_params,
            "train_samples": self.train_samples,
            "command": list(self.command),
            "libraries": dict(self.libraries),
            "host": dict(self.host),
        }
        return d | ({"features": self.features.to_dict()} if self.features is not None else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingRecord:
        """The record of a config.json; ValueError / KeyError / TypeError naming what is malformed."""
        if not isinstance(d, dict):
            raise TypeError("config.json must hold a JSON object")
        version = int(d.get("format_version", RUN_FORMAT))
        if version > RUN_FORMAT:
            raise ValueError(f"RUN format {version} is newer than this fcache reads ({RUN_FORMAT}); upgrade fcache")
        if not isinstance(d["task"], dict) or not isinstance(d["levels"], list):
            raise TypeError("task must be an object and levels a list")
        command, libraries, host = d.get("command", []), d.get("libraries", {}), d.get("host", {})
        if not isinstance(command, list) or not isinstance(libraries, dict) or not isinstance(host, dict):
            raise TypeError("command must be a list, libraries and host objects")
        return cls(
            config=TrainConfig.from_dict(d["config"]),
            store_fingerprint=str(d.get("store_fingerprint", "")),
            task=dict(d["task"]),
            levels=tuple(LevelSpec.from_dict(x) for x in d["levels"]),
            trainable_params=int(d["trainable_params"]),
            train_samples=int(d.get("train_samples", 0)),
            features=FeatureSource.from_dict(d["features"]) if d.get("features") is not None else None,
            command=tuple(str(a) for a in command),
            libraries={str(k): str(v) for k, v in libraries.items()},
            host=dict(host),
            format_version=version,
            fcache_version=str(d.get("fcache_version", "")),
        )

    def require_features(self) -> FeatureSource:
        """Where the run's features came from; InputError for a run written before fcache recorded it."""
        if self.features is None:
            raise InputError(
                f"this run (fcache {self.fcache_version or '?'}) does not record its backbone; retrain it with this fcache, "
                "or evaluate it on stores with `fcache eval`"
            )
        return self.features

    def identity(self) -> dict[str, Any]:
        """What must match for a folder to hold the same run: the config's identity (the head spelled canonically)
        and the training store's fingerprint."""
        return {**self.config.identity(), "head": self.head, "store_fingerprint": self.store_fingerprint}


class RunDir:
    """Paths and files of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read_config(self) -> TrainingRecord | None:
        """The run's record, checked field by field (InputError naming the file and the field); None without one."""
        p = self.path / CONFIG
        if not p.is_file():
            return None
        d = read_json(p, InputError)
        version = d.get("format_version", RUN_FORMAT) if isinstance(d, dict) else RUN_FORMAT
        if isinstance(version, int) and version > RUN_FORMAT:
            raise InputError(f"{p}: RUN format {version} is newer than this fcache reads ({RUN_FORMAT}); upgrade fcache")
        check_record(TrainingRecord, d, str(p), InputError)
        try:
            return TrainingRecord.from_dict(d)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{p} holds an impossible value ({type(e).__name__}: {e}); it was edited or damaged") from None

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
            if self.path.exists() and any(self.path.iterdir()):
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

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """The numbered checkpoints in the folder, (iteration, path), oldest first."""
        found = [(int(m.group(1)), p) for p in self.path.glob("checkpoint-*.pt") if (m := CHECKPOINT_NAME.fullmatch(p.name))]
        return sorted(found)

    def checkpoint_path(self) -> Path | None:
        """The newest checkpoint (a run of an earlier fcache: its ``checkpoint.pt``); None without one."""
        numbered = self.checkpoints()
        if numbered:
            return numbered[-1][1]
        old = self.path / OLD_CHECKPOINT
        return old if old.is_file() else None

    def save_checkpoint(self, state: dict[str, Any], *, weights: dict[str, torch.Tensor] | None = None, keep: int = 1) -> None:
        """Write ``state`` (with ``iteration`` and ``model``) as checkpoint-<iteration>.pt and ``weights`` (default: the
        state's model) as model.safetensors, each atomically; then only the newest ``keep`` checkpoints stay."""
        self.path.mkdir(parents=True, exist_ok=True)
        iteration = int(state["iteration"])
        with atomic_file(self.path / CHECKPOINT.format(iteration=iteration)) as tmp:
            torch.save(state, tmp)
        self.save_weights(MODEL, state["model"] if weights is None else weights, {"iteration": str(iteration)})
        for _, p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)
        (self.path / OLD_CHECKPOINT).unlink(missing_ok=True)

    def save_best(self, weights: dict[str, torch.Tensor], iteration: int, metric: str, value: float) -> None:
        """best.safetensors: ``weights`` of the evaluation at ``iteration`` that scored ``value`` in ``metric``, the best so far."""
        self.save_weights(BEST, weights, {"iteration": str(iteration), "metric": metric, "value": repr(float(value))})

    def save_weights(self, name: str, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """RUN/``name`` as safetensors, atomically, with ``metadata`` and the run's record (``fcache.run``)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        record = self.read_config()
        if record is not None:
            metadata = metadata | {RECORD_KEY: json.dumps(record.to_dict(), sort_keys=True)}
        with atomic_file(self.path / name) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (None without one), loaded as tensors only (``weights_only``, never unpickled)."""
        p = self.checkpoint_path()
        if p is None:
            return None
        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of files it will refuse anyway
                warnings.simplefilter("ignore")
                state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a cut, garbage or hostile file: torch's own message may advise unsafe loading
            raise InputError(
                f"{p} is not a readable fcache checkpoint ({type(e).__name__}); it is damaged: delete it to train again"
            ) from None
        if not isinstance(state, dict) or not {"iteration", "model", "optimizer"} <= set(state):
            raise InputError(f"{p} is not an fcache checkpoint (no iteration, model and optimizer state); delete it to train again")
        return state

    def load_model(self, name: str = MODEL) -> tuple[dict[str, torch.Tensor], int]:
        """The saved weights (model.safetensors, or ``name``: best.safetensors) and the iteration they were saved at."""
        p = self.path / name
        if not p.is_file():
            raise InputError(f"{self.path} has no trained weights yet ({name}); train (or resume) until a checkpoint is written")
        try:
            with safe_open(str(p), framework="pt") as f:
                iteration = int((f.metadata() or {}).get("iteration", -1))
            return load_file(str(p)), iteration
        except Exception as e:  # a cut or garbage file (safetensors refuses anything else safely)
            raise InputError(
                f"{p} is not readable safetensors ({type(e).__name__}); it is damaged: resume the run to write it again"
            ) from None

    # -- metrics -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and metrics.csv (the table written again when the record brings new columns)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        header = _csv_header(self.path / METRICS_CSV)
        if header is not None and set(record) <= set(header):
            with open(self.path / METRICS_CSV, "a", newline="") as f:
                csv.DictWriter(f, header).writerow(record)
        else:
            self.write_csv(self.metrics())

    def write_csv(self, records: list[dict[str, Any]]) -> None:
        """metrics.csv: one row per record, a column per key (``event`` and ``iter`` first), empty where a record has none."""
        columns = list(dict.fromkeys(["event", "iter", *(k for r in records for k in r)]))
        with atomic_file(self.path / METRICS_CSV) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(records)

    def metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl; InputError naming the line that is not a JSON object."""
        p = self.path / METRICS
        if not p.is_file():
            return []
        out = []
        for k, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            record = load_json(line, f"{p}, line {k},", InputError)
            if not isinstance(record, dict):
                raise InputError(f"{p}, line {k}, is not a JSON object; the file was edited or damaged")
            out.append(record)
        return out

    def truncate_metrics(self, iteration: int) -> None:
        """Drop records past ``iteration`` (logged after the checkpoint a resumed run restarts from)."""
        kept = [r for r in self.metrics() if r.get("iter", 0) <= iteration]
        with atomic_file(self.path / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.write_csv(kept)

    # -- evaluations ---------------------------------------------------------------------------
    def eval_dir(self, store_path: str | Path, fingerprint: str) -> Path:
        """``RUN/eval/<store name>``, created, for the store at ``store_path``: the same folder every time that store is
        evaluated, another one (``<name>-<fingerprint[:8]>``) for another store of the same name."""
        name = Path(str(store_path).rstrip("/")).name.removesuffix(".zarr") or "store"
        for candidate in (name, f"{name}-{fingerprint[:8]}"):
            d = self.path / EVAL / candidate
            known = d / EVAL_STORE
            if known.is_file() and json.loads(known.read_text()).get("fingerprint") != fingerprint:
                continue
            d.mkdir(parents=True, exist_ok=True)
            write_json(known, {"path": str(Path(store_path).absolute()), "fingerprint": fingerprint})
            return d
        raise AssertionError("a fingerprint-named folder holds its own store")


def _csv_header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def host_info() -> dict[str, Any]:
    """The machine a run trains on: host name, platform, Python, CPU count and GPUs."""
    gpus = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"name": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "gpus": gpus}  # fmt: skip


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {json.dumps(a.get(k))} != {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
