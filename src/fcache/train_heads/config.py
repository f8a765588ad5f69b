"""Frozen configs of the head-training stage, each setting written once as a field with its flag.

``fcache train-head`` builds a :class:`TrainConfig` from its flags; Python callers construct one directly. Either way
the hyper-parameters left unset (None) take the task's and head's defaults (``TaskDef.train_defaults``: the paper's
Tables 11-13), so ``TrainConfig(task="segmentation", head="upernet", ...)`` trains as the command would. Without a
task default, the detection recipe of Table 11 applies (COCO, frozen setting, 100% data): AdamW, lr 3e-4, weight
decay 0.05, betas (0.9, 0.999), 500 warm-up iterations, batch 16, multi-step decay by 0.1 at 8/12 and 11/12.
``config.json`` records the resolved values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fcache.common.devices import DEVICE_HELP
from fcache.common.errors import InputError
from fcache.common.flags import flag, required
from fcache.store.access import ReadAccess

SCHEDULES = ("step", "cosine", "linear")

# Table 11 (detection, frozen): what a hyper-parameter is when neither a flag nor the task's defaults set it
GENERIC_DEFAULTS: dict[str, Any] = {
    "batch_size": 16,
    "lr": 3e-4,
    "weight_decay": 0.05,
    "warmup": 500,
    "warmup_epochs": None,
    "warmup_factor": 1e-3,
    "schedule": "step",
    "steps": (8 / 12, 11 / 12),
}
WARMUP_FIELDS = ("warmup", "warmup_epochs")

# Fields that do not change what is trained: they may differ when a run is resumed.
OPERATIONAL = ("store", "val_store", "out", "num_workers", "prefetch", "device", "checkpoint_every", "log_every", "resume", "stop_at",
               "storage_options", "cache_dir", "cache_size")  # fmt: skip
UNRECORDED = ("storage_options",)  # may hold credentials: never written into RUN/config.json


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of fractions, e.g. 0.667,0.917") from None


@dataclass(frozen=True)
class TrainConfig(ReadAccess):
    """Everything ``fcache train-head`` needs. ``identity()`` decides whether a RUN folder holds this run."""

    store: str = required("Training feature store.")
    out: str = required("RUN folder: config.json, checkpoint, metrics.jsonl. With several --head: the parent of one RUN folder per head.")
    head: str = required("Head spec NAME[:key=value,...], e.g. fpn, bifpn:layers=5,roi=cascade.")
    iters: int = required("Training iterations (the schedule is relative to this).")
    task: str = flag("detection", "The task the head is trained for.", choices="fcache.train_heads.tasks:TASKS")
    val_store: str | None = flag(None, "Store to evaluate on when training finishes.", show_default=False)
    batch_size: int = flag(None, "Samples per iteration [default: per task: 16, video and classification 64].", show_default=False)
    lr: float = flag(None, "Base AdamW learning rate [default: per task and head].", show_default=False)
    weight_decay: float = flag(None, "AdamW weight decay [default: per task and head].", show_default=False)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = flag(None, "Linear warm-up iterations [default: per task and head].", show_default=False)
    warmup_factor: float = flag(None, "lr multiplier at iteration 0 of the warm-up [default: per head, 1e-3].", show_default=False)
    warmup_epochs: float | None = flag(None, "Warm-up in epochs of the training set instead (video default: 2.5).", show_default=False)
    schedule: str = flag(None, "Learning-rate decay [default: per task and head].", choices=SCHEDULES, show_default=False)
    steps: tuple[float, ...] = flag(None, "Multi-step milestones as fractions of --iters [default: 8/12,11/12].", parse=parse_fractions,
                                    show_default=False)  # fmt: skip
    gamma: float = flag(0.1, "Multi-step decay factor.")
    clip: float | None = flag(None, "Clip the gradient norm to this value.", show_default=False)
    seed: int = flag(0, "Seed of the head's initialisation, batch order and views.")
    train_fraction: float = flag(1.0, "Train on a seeded subset (Table 6: 0.01, 0.1).")
    num_workers: int = flag(2, "DataLoader worker processes.")
    prefetch: int = flag(2, "Batches each DataLoader worker reads ahead (bounded prefetch).")
    device: str = flag("auto", DEVICE_HELP)
    checkpoint_every: int = flag(1000, "Iterations between checkpoints.")
    log_every: int = flag(20, "Iterations per metrics.jsonl record.")
    resume: bool = flag(False, "Continue the run in --out from its checkpoint (bit-exact on CPU).", show_default=False)
    stop_at: int | None = flag(None, "Stop (with a checkpoint) after this iteration; finish later with --resume.", show_default=False)

    def __post_init__(self) -> None:
        unset = [k for k in GENERIC_DEFAULTS if getattr(self, k) is None]
        if unset:
            from fcache.train_heads.tasks import task_defaults

            defaults = {**GENERIC_DEFAULTS, **task_defaults(self.task, self.head)}
            if any(k not in unset for k in WARMUP_FIELDS):  # a warm-up given in either unit replaces the default in both
                defaults |= {"warmup": 0, "warmup_epochs": None}
            for k in unset:
                object.__setattr__(self, k, defaults[k])
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "betas", tuple(self.betas))
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
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})"),
            (self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})"),
            (self.stop_at is None or self.stop_at >= 1, f"--stop-at must be at least 1 (got {self.stop_at})"),
            (self.prefetch >= 1, f"--prefetch must be at least 1 (got {self.prefetch})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        self.check_access()

    @classmethod
    def from_flags(cls, **kw: Any) -> TrainConfig:
        """A config from flag values (None: not given); refuses a warm-up given in both units."""
        if all(kw.get(k) is not None for k in WARMUP_FIELDS):
            raise InputError("give --warmup (iterations) or --warmup-epochs, not both")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in UNRECORDED}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights (all but the operational ones)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}

    def resolved(self, train_samples: int) -> TrainConfig:
        """This config with ``warmup_epochs`` (when set) turned into ``warmup = ceil(epochs * train_samples / batch_size)``."""
        if self.warmup_epochs is None:
            return self
        return dataclasses.replace(self, warmup=math.ceil(self.warmup_epochs * train_samples / self.batch_size))


@dataclass(frozen=True)
class EvalConfig(ReadAccess):
    """``fcache eval RUN --store VAL``."""

    run: str
    store: str = required("Feature store to evaluate on.")
    batch_size: int = flag(2, "Samples per evaluation batch.")
    num_workers: int = flag(2, "DataLoader worker processes.")
    device: str = flag("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1 (got {self.batch_size})")
        self.check_access()

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in UNRECORDED}


MIN_EXAMPLES = 4  # the unbiased HSIC estimator needs n >= 4


@dataclass(frozen=True)
class CkaConfig(ReadAccess):
    """``fcache cka RUN --store S``."""

    run: str
    store: str = required("Store whose samples are analysed.")
    samples: int = flag(64, "Samples drawn (seeded) from the store.")
    batch_size: int = flag(8, f"Minibatch of the unbiased HSIC estimator (>= {MIN_EXAMPLES}).")
    out: str = flag("", "Folder for cka.json + cka.png [default: RUN/cka].", show_default=False)
    device: str = flag("auto", DEVICE_HELP)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < MIN_EXAMPLES:
            raise InputError(f"--batch-size must be at least {MIN_EXAMPLES} (the unbiased HSIC needs 4 examples per minibatch)")
        if self.samples < self.batch_size:
            raise InputError(f"--samples ({self.samples}) must be at least --batch-size ({self.batch_size})")
        self.check_access()


@dataclass(frozen=True)
class SweepConfig:
    """``fcache sweep``: the SPEC file, the output folder (``""``: the spec's) and where variants run."""

    spec: str
    out: str = flag("", "Folder for runs/ and results.* [default: SPEC's out key].", show_default=False)
    cluster: str = flag("", "local:N: one variant per worker of a local dask cluster of N processes.", show_default=False)
    scheduler: str = flag("", "tcp://HOST:PORT: one variant per worker thread of a running dask cluster.", show_default=False)

    def __post_init__(self) -> None:
        self.target()

    def target(self, threads: int = 0) -> Any:
        """Where the variants run (``fcache.common.cluster.ClusterTarget``): one per single-threaded worker of a local
        cluster or of the scheduler's; None: in this process."""
        from fcache.common.cluster import parse_target

        return parse_target(self.cluster, self.scheduler, threads_per_worker=1, torch_threads=threads)
