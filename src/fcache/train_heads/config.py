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
from fcache.common.flags import check_flags, flag, required

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
OPERATIONAL = ("store", "val_store", "out", "num_workers", "prefetch", "device", "checkpoint_every", "log_every", "resume", "stop_at")


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of fractions, e.g. 0.667,0.917") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``fcache train-head`` needs. ``identity()`` decides whether a RUN folder holds this run."""

    store: str = required("Training feature store.")
    out: str = required("RUN folder: config.json, checkpoint, metrics.jsonl. With several --head: the parent of one RUN folder per head.")
    head: str = required("Head spec NAME[:key=value,...], e.g. fpn, bifpn:layers=5,roi=cascade.")
    iters: int = required("Training iterations (the schedule is relative to this).", min=1)
    task: str = flag("detection", "The task the head is trained for.", choices="fcache.train_heads.tasks:TASKS")
    val_store: str | None = flag(None, "Store to evaluate on when training finishes.", show_default=False)
    batch_size: int = flag(None, "Samples per iteration [default: per task: 16, video and classification 64].", show_default=False, min=1)
    lr: float = flag(None, "Base AdamW learning rate [default: per task and head].", show_default=False, above=0, max=100)
    weight_decay: float = flag(None, "AdamW weight decay [default: per task and head].", show_default=False, min=0, max=100)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = flag(None, "Linear warm-up iterations [default: per task and head].", show_default=False, min=0)
    warmup_factor: float = flag(
        None, "lr multiplier at iteration 0 of the warm-up [default: per head, 1e-3].", show_default=False, above=0, max=1
    )
    warmup_epochs: float | None = flag(
        None, "Warm-up in epochs of the training set instead (video default: 2.5).", show_default=False, min=0, max=1e6
    )
    schedule: str = flag(None, "Learning-rate decay [default: per task and head].", choices=SCHEDULES, show_default=False)
    steps: tuple[float, ...] = flag(None, "Multi-step milestones as fractions of --iters [default: 8/12,11/12].", parse=parse_fractions,
                                    show_default=False, above=0, max=1)  # fmt: skip
    gamma: float = flag(0.1, "Multi-step decay factor.", above=0, max=1e3)
    clip: float | None = flag(None, "Clip the gradient norm to this value.", show_default=False, above=0)
    seed: int = flag(0, "Seed of the head's initialisation, batch order and views.", min=0, max=2**63 - 1)
    train_fraction: float = flag(1.0, "Train on a seeded subset (Table 6: 0.01, 0.1).", above=0, max=1)
    num_workers: int = flag(2, "DataLoader worker processes.", min=0, max=1024)
    prefetch: int = 2
    device: str = flag("auto", DEVICE_HELP)
    checkpoint_every: int = flag(1000, "Iterations between checkpoints.", min=1)
    log_every: int = flag(20, "Iterations per metrics.jsonl record.", min=1)
    resume: bool = flag(False, "Continue the run in --out from its checkpoint (bit-exact on CPU).", show_default=False)
    stop_at: int | None = flag(
        None, "Stop (with a checkpoint) after this iteration; finish later with --resume.", show_default=False, min=1
    )

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
        check_flags(self)
        if self.schedule not in SCHEDULES:
            raise InputError(f"--schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")

    @classmethod
    def from_flags(cls, **kw: Any) -> TrainConfig:
        """A config from flag values (None: not given); refuses a warm-up given in both units."""
        if all(kw.get(k) is not None for k in WARMUP_FIELDS):
            raise InputError("give --warmup (iterations) or --warmup-epochs, not both")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
class EvalConfig:
    """``fcache eval RUN --store VAL``."""

    run: str
    store: str = required("Feature store to evaluate on.")
    batch_size: int = flag(2, "Samples per evaluation batch.", min=1)
    num_workers: int = flag(2, "DataLoader worker processes.", min=0, max=1024)
    device: str = flag("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        check_flags(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIN_EXAMPLES = 4  # the unbiased HSIC estimator needs n >= 4


@dataclass(frozen=True)
class CkaConfig:
    """``fcache cka RUN --store S``."""

    run: str
    store: str = required("Store whose samples are analysed.")
    samples: int = flag(64, "Samples drawn (seeded) from the store.", min=1)
    batch_size: int = flag(8, f"Minibatch of the unbiased HSIC estimator (>= {MIN_EXAMPLES}).", min=1)
    out: str = flag("", "Folder for cka.json + cka.png [default: RUN/cka].", show_default=False)
    device: str = flag("auto", DEVICE_HELP)
    seed: int = 0

    def __post_init__(self) -> None:
        check_flags(self)
        if self.batch_size < MIN_EXAMPLES:
            raise InputError(f"--batch-size must be at least {MIN_EXAMPLES} (the unbiased HSIC needs 4 examples per minibatch)")
        if self.samples < self.batch_size:
            raise InputError(f"--samples ({self.samples}) must be at least --batch-size ({self.batch_size})")


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
