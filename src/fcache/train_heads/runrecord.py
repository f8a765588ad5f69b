"""What a RUN folder records: ``config.json`` (the :class:`TrainingRecord`) and each evaluation's ``metrics.json`` and
``store.json`` under ``eval/<store>/``, read and written as records (``fcache.common.records``).

``config.json`` holds the TrainConfig, the store fingerprint, the task description (head spec, class or category
names and ids), the levels and the trainable parameter count; and everything that rebuilds the frozen backbone and
its inputs without the store (the training store's backbone, preprocessing and dataset records, :class:`FeatureSource`),
the fcache and library versions, the command line and the host. ``RUN_FORMAT`` migrates what earlier releases wrote.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from fcache._version import __version__
from fcache.common.errors import InputError
from fcache.common.records import Document, Format, Migration, Record, fill, renamed
from fcache.spec import BackboneInfo, DatasetInfo, LevelSpec, Manifest, Preprocessing, library_versions, source_recorded_whole
from fcache.train_heads.config import RENAMED, TrainConfig

RANDOM_INIT = "random-init"  # BackboneInfo.weights of a random backbone: its weights are made from the extraction seed


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
class FeatureSource(Record):
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


def _features_source(d: Document) -> Document:
    """``features.dataset`` of a training store written before the source was recorded whole (see the manifest's)."""
    features = d.get("features")
    if not isinstance(features, dict):
        return d
    dataset = source_recorded_whole(features.get("dataset"), features.get("preprocessing"))
    return d if dataset is features.get("dataset") else {**d, "features": {**features, "dataset": dataset}}


RUN_FORMAT = Format(
    1,
    refused="RUN format {version} is newer than this fcache reads ({current}); upgrade fcache",
    migrations=(
        Migration(1, fill(fcache_version="", store_fingerprint="", train_samples=0)),  # not recorded by the first runs
        *(Migration(1, renamed(old, new, inside="config")) for old, new in RENAMED.items()),
        Migration(1, _features_source),
    ),
)


@dataclass(frozen=True)
class TrainingRecord(Record):
    """What RUN/config.json holds: the identity of the run (its config, already resolved, and the store's fingerprint),
    what it trains (the task's description, which rebuilds the head without the store, and the levels it reads) and
    where its features came from (``features``: None in runs written before fcache recorded it), with provenance."""

    FORMAT = RUN_FORMAT

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
    format_version: int = RUN_FORMAT.version
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


@dataclass(frozen=True)
class EvalStore(Record):
    """``RUN/eval/<name>/store.json``: the store whose evaluations the folder holds (another store of the same name gets
    ``<name>-<fingerprint[:8]>``)."""

    path: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class EvalRecord(Record):
    """``RUN/eval/<name>/metrics.json``: one evaluation of the run's weights at ``iter`` on ``store`` (also logged into
    metrics.jsonl, with the metrics beside the other fields)."""

    event: str = "eval"
    iter: int
    store: str
    samples: int
    eval_dir: str
    metrics: dict[str, float]
    form: str = ""  # the stored form the head's levels were read in (``evaluation.stored_form``); "" in earlier records

    def logged(self) -> dict[str, Any]:
        """The metrics.jsonl record of this evaluation."""
        d = self.to_dict()
        return {k: v for k, v in d.items() if k != "metrics"} | dict(self.metrics)


def host_info() -> dict[str, Any]:
    """The machine a run trains on: host name, platform, Python, CPU count and GPUs."""
    gpus = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"name": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "gpus": gpus}  # fmt: skip
