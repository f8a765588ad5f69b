"""Frozen configs of the head-training stage, built by ``cli.py`` from flags and written into RUN/config.json.

Defaults follow the paper's Table 11 (COCO, frozen setting, 100% data): AdamW, lr 3e-4, weight decay 0.05,
betas (0.9, 0.999), 500 warm-up iterations, batch 16, multi-step decay by 0.1 at 8/12 and 11/12 of the run.
Other tasks' defaults come from their ``train_defaults`` (run.TASKS) and flags override them (``hyper_parameters``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fcache.common.errors import InputError

SCHEDULES = ("step", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")

# Fields that do not change what is trained: they may differ when a run is resumed.
OPERATIONAL = ("store", "val_store", "out", "num_workers", "prefetch", "device", "checkpoint_every", "log_every", "resume", "stop_at")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``fcache train-head`` needs. ``identity()`` decides whether a RUN folder holds this run."""

    store: str
    out: str
    head: str
    iters: int
    task: str = "detection"
    val_store: str | None = None
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 500
    warmup_factor: float = 1e-3  # lr multiplier at iteration 0, rising linearly to 1 at ``warmup``
    warmup_epochs: float | None = None  # warm-up in epochs of the training set instead: ``resolved`` sets ``warmup`` from it
    schedule: str = "step"
    steps: tuple[float, ...] = (8 / 12, 11 / 12)  # multi-step milestones as fractions of ``iters``
    gamma: float = 0.1
    clip: float | None = None  # max gradient norm; None: no clipping
    seed: int = 0
    train_fraction: float = 1.0
    num_workers: int = 2
    prefetch: int = 2
    device: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 20
    resume: bool = False  # continue the run in ``out`` from its checkpoint (a fresh start when it has none)
    stop_at: int | None = None  # stop after this iteration (checkpointed), e.g. to split a run into jobs

    def __post_init__(self) -> None:
        checks = [
            (self.iters >= 1, f"--iters must be at least 1 (got {self.iters})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.warmup >= 0, f"--warmup must be >= 0 (got {self.warmup})"),
            (self.warmup_epochs is None or self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0 (got {self.warmup_epochs})"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})"),
            (all(0 < s <= 1 for s in self.steps), f"--steps must be fractions of the run in (0, 1] (got {self.steps})"),
            (self.clip is None or self.clip > 0, f"--clip must be positive (got {self.clip})"),
            (0 < self.train_fraction <= 1, f"--train-fraction must be in (0, 1] (got {self.train_fraction})"),
            (self.num_workers >= 0, f"--num-workers must be >= 0 (got {self.num_workers})"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})"),
            (self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})"),
            (self.stop_at is None or self.stop_at >= 1, f"--stop-at must be at least 1 (got {self.stop_at})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("betas", "steps"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights (all but the operational ones)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}

    def resolved(self, train_samples: int) -> TrainConfig:
        """This config with ``warmup_epochs`` (when set) turned into ``warmup = ceil(epochs * train_samples / batch_size)``."""
        if self.warmup_epochs is None:
            return self
        return dataclasses.replace(self, warmup=math.ceil(self.warmup_epochs * train_samples / self.batch_size))


WARMUP_FIELDS = ("warmup", "warmup_epochs")


def hyper_parameters(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig fields: a task's defaults under the flags given (None: not given).

    A warm-up given in either unit (iterations or epochs) replaces the task's default warm-up in both.
    """
    chosen = {k: v for k, v in given.items() if v is not None}
    if all(k in chosen for k in WARMUP_FIELDS):
        raise InputError("give --warmup (iterations) or --warmup-epochs, not both")
    if any(k in chosen for k in WARMUP_FIELDS):
        defaults = {k: v for k, v in defaults.items() if k not in WARMUP_FIELDS}
    return {**defaults, **chosen}


@dataclass(frozen=True)
class EvalConfig:
    """``fcache eval RUN --store VAL``."""

    run: str
    store: str
    batch_size: int = 2
    num_workers: int = 2
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.device not in DEVICES:
            raise InputError(f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
