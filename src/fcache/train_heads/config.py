"""Frozen configs of the head-training stage, each setting written once as a field with its flag.

``fcache train-head`` builds a :class:`TrainConfig` from its flags; Python callers construct one directly. The
hyper-parameters left unset (None) take the task's and head's defaults (``TaskDef.train_defaults``: the paper's
Tables 11-13) when the run starts (``fcache.train_heads.defaults.with_defaults``, which ``run_train`` applies), so
``TrainConfig(task="segmentation", head="upernet", ...)`` trains as the command would. ``config.json`` records the
resolved values: lengths given in epochs (``--epochs``, ``--warmup-epochs``) become iterations of the training set
(``TrainConfig.resolved``); one iteration is one optimiser step on ``batch_size x grad_accum`` samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fcache.common.devices import DEVICE_HELP
from fcache.common.errors import InputError
from fcache.common.flags import check_flags, flag, required
from fcache.common.records import Record
from fcache.store.access import ReadAccess
from fcache.store.readahead import READ_AHEAD

SCHEDULES = ("step", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 on CUDA, fp32 elsewhere
LOGGERS = ("auto", "tensorboard", "wandb", "none")  # auto: TensorBoard when it is installed

WARMUP_FIELDS = ("warmup", "warmup_epochs")

# Fields that do not change what is trained: they may differ when a run is resumed.
OPERATIONAL = ("store", "val_store", "out", "num_workers", "prefetch", "read_ahead", "device", "checkpoint_every", "log_every", "resume",
               "stop_at", "eval_every", "keep_best", "keep_last", "patience", "logger", "storage_options", "cache_dir",
               "cache_size")  # fmt: skip
RENAMED = {"steps": "lr_steps"}  # config.json and SPEC files of earlier releases: old field name -> new


def run_settings(d: dict[str, Any]) -> dict[str, Any]:
    """The settings of a ``--config`` document: a RUN's config.json gives its ``config`` object as it was given (a length
    given in epochs without the iterations it resolved to; fields renamed since under their new names); any other
    document is its own settings."""
    if not (isinstance(d.get("config"), dict) and "store_fingerprint" in d):
        return d
    cfg = {RENAMED.get(k, k): v for k, v in d["config"].items()}
    for epochs, iterations in (("epochs", "iters"), ("warmup_epochs", "warmup")):
        if cfg.get(epochs) is not None:
            cfg.pop(iterations, None)
    return cfg


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{text!r} is not a comma-separated list of fractions, e.g. 0.667,0.917") from None


def parse_every(text: str) -> str:
    """``--eval-every``: ``N`` iterations or ``Ne`` epochs (``2e``, ``0.5e``), returned as given (stripped)."""
    text = str(text).strip()
    epochs = text.endswith("e")
    try:
        value = float(text[:-1]) if epochs else int(text)
    except ValueError:
        raise InputError(f"--eval-every {text}: use N (iterations) or Ne (epochs), e.g. 500 or 2e") from None
    if not math.isfinite(value):  # nan, inf, 1e400: not a count
        raise InputError(f"--eval-every {text}: use N (iterations) or Ne (epochs), e.g. 500 or 2e")
    if value <= 0:
        raise InputError(f"--eval-every {text}: must be greater than 0")
    return text


@dataclass(frozen=True)
class TrainConfig(ReadAccess, Record):
    """Everything ``fcache train-head`` needs. ``identity()`` decides whether a RUN folder holds this run."""

    UNRECORDED = ("storage_options",)  # may hold credentials: never written into RUN/config.json

    store: str = required("Training feature store.")
    out: str = required("RUN folder: config.json, checkpoints, weights, metrics. With several --head: the parent of a RUN folder each.")
    head: str = required("Head spec NAME[:key=value,...], e.g. fpn, bifpn:layers=5,roi=cascade.")
    iters: int = flag(None, "Training iterations (the schedule is relative to them); or --epochs.", show_default=False, min=1)
    epochs: float | None = flag(
        None, "Train for E epochs of the training set instead of --iters (ceil(E x samples / samples per iteration)).",
        show_default=False, above=0, max=1e6,
    )  # fmt: skip
    task: str = flag("detection", "The task the head is trained for.", choices="fcache.train_heads.tasks:TASKS")
    val_store: str | None = flag(None, "Store to evaluate on (when training finishes, and every --eval-every).", show_default=False)
    eval_every: str | None = flag(None, "Evaluate on --val-store every N iterations, or every Ne epochs (e.g. 2e).", show_default=False,
                                  parse=parse_every)  # fmt: skip
    keep_best: bool = flag(True, "Keep best.safetensors: the weights of the evaluation with the best main metric.",
                           secondary="--no-keep-best")  # fmt: skip
    patience: int | None = flag(
        None, "Stop early when P evaluations in a row did not improve the best main metric.", show_default=False, min=1
    )
    batch_size: int = flag(
        None,
        "Samples per iteration, at most the training set's [default: per task: 16, video and classification 64].",
        show_default=False,
        min=1,
    )
    grad_accum: int = flag(1, "Accumulate the gradients of K batches of --batch-size per iteration (K x batch samples per step).",
                           min=1, max=4096)  # fmt: skip
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
    lr_steps: tuple[float, ...] = flag(None, "Multi-step milestones as fractions of the run [default: 8/12,11/12].", parse=parse_fractions,
                                       show_default=False, above=0, max=1)  # fmt: skip
    gamma: float = flag(0.1, "Multi-step decay factor.", above=0, max=1e3)
    clip: float | None = flag(None, "Clip the gradient norm to this value.", show_default=False, above=0)
    precision: str = flag("auto", "Autocast dtype: auto (bf16 on CUDA, else fp32), fp32, bf16, or fp16 with a gradient scaler "
                                  "(GPUs without bf16, e.g. T4, V100).", choices=PRECISIONS)  # fmt: skip
    ema: float | None = flag(
        None, "Keep an exponential moving average of the weights with this decay (e.g. 0.999): evaluated and saved as the weights.",
        show_default=False, above=0, below=1,
    )  # fmt: skip
    seed: int = flag(0, "Seed of the head's initialisation, batch order and views.", min=0, max=2**63 - 1)
    train_fraction: float = flag(1.0, "Train on a seeded subset (Table 6: 0.01, 0.1).", above=0, max=1)
    num_workers: int = flag(2, "DataLoader worker processes.", min=0, max=1024)
    prefetch: int = flag(2, "Batches each DataLoader worker reads ahead (bounded prefetch).", min=1, max=1024)
    read_ahead: int = flag(READ_AHEAD, "From a store in object storage: range requests each reading process keeps in flight "
                           "across batches, training and evaluation (0: batch by batch). More carry more where requests are "
                           "slow; at most 256 MB of chunks are held.", min=0, max=4096)  # fmt: skip
    device: str = flag("auto", DEVICE_HELP)
    checkpoint_every: int = flag(1000, "Iterations between checkpoints.", min=1)
    keep_last: int = flag(1, "Checkpoints kept: the newest K checkpoint-<iter>.pt.", min=1, max=1_000_000)
    log_every: int = flag(20, "Iterations per metrics.jsonl record.", min=1)
    logger: str = flag("auto", "Metrics and prediction pictures also to: auto (TensorBoard when installed), tensorboard, wandb, none.",
                       choices=LOGGERS)  # fmt: skip
    resume: bool = flag(False, "Continue the run in --out from its checkpoint (bit-exact on CPU).", show_default=False)
    stop_at: int | None = flag(
        None, "Stop (with a checkpoint) after this iteration; finish later with --resume.", show_default=False, min=1
    )

    def __post_init__(self) -> None:
        if self.lr_steps is not None:
            object.__setattr__(self, "lr_steps", tuple(self.lr_steps))
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.eval_every is not None:
            object.__setattr__(self, "eval_every", parse_every(str(self.eval_every)))
        check_flags(self)
        for name, value, choices in (("schedule", self.schedule, SCHEDULES), ("precision", self.precision, PRECISIONS),
                                     ("logger", self.logger, LOGGERS)):  # fmt: skip
            if value is not None and value not in choices:
                raise InputError(f"--{name} {value!r}: use one of {', '.join(choices)}")
        if self.iters is None and self.epochs is None:
            raise InputError("give --iters N or --epochs E: how long to train")
        if self.eval_every is not None and not self.val_store:
            raise InputError(f"--eval-every {self.eval_every} evaluates on --val-store: give one")
        if self.patience is not None and self.eval_every is None:
            raise InputError(f"--patience {self.patience} counts evaluations: give --eval-every (and --val-store)")
        self.check_access()

    @classmethod
    def from_flags(cls, **kw: Any) -> TrainConfig:
        """A config from flag values (None: not given); refuses a length given in both units."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in kw.items() if k in names})  # each value checked first
        if all(kw.get(k) is not None for k in WARMUP_FIELDS):
            raise InputError("give --warmup (iterations) or --warmup-epochs, not both")
        if kw.get("iters") is not None and kw.get("epochs") is not None:
            raise InputError("give --iters or --epochs, not both")
        return cfg

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights (all but the operational ones)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}

    @property
    def samples_per_iter(self) -> int:
        """Samples of one optimiser step: ``batch_size x grad_accum``."""
        return self.batch_size * self.grad_accum

    def iterations(self, epochs: float, train_samples: int) -> int:
        """``epochs`` of a training set of ``train_samples`` in iterations: ``ceil(epochs * train_samples / samples_per_iter)``."""
        return math.ceil(epochs * train_samples / self.samples_per_iter)

    def resolved(self, train_samples: int) -> TrainConfig:
        """This config with the lengths given in epochs (``epochs``, ``warmup_epochs``) turned into iterations."""
        changes: dict[str, Any] = {}
        if self.epochs is not None:
            changes["iters"] = max(1, self.iterations(self.epochs, train_samples))
        if self.warmup_epochs is not None:
            changes["warmup"] = self.iterations(self.warmup_epochs, train_samples)
        return dataclasses.replace(self, **changes) if changes else self

    def eval_interval(self, train_samples: int) -> int | None:
        """Iterations between evaluations (``eval_every`` in epochs converted, at least 1); None: only at the end."""
        if self.eval_every is None:
            return None
        if self.eval_every.endswith("e"):
            return max(1, self.iterations(float(self.eval_every[:-1]), train_samples))
        return int(self.eval_every)


@dataclass(frozen=True)
class EvalConfig(ReadAccess):
    """``fcache eval RUN --store VAL``."""

    run: str
    store: str = required("Feature store to evaluate on.")
    batch_size: int = flag(2, "Samples per evaluation batch.", min=1)
    num_workers: int = flag(2, "DataLoader worker processes.", min=0, max=1024)
    device: str = flag("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        check_flags(self)
        self.check_access()


MIN_EXAMPLES = 4  # the unbiased HSIC estimator needs n >= 4


@dataclass(frozen=True)
class CkaConfig(ReadAccess):
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
        self.check_access()


@dataclass(frozen=True)
class ReportConfig:
    """``fcache report RUN...``: the runs tabulated and where the report goes."""

    runs: tuple[str, ...]
    out: str = flag("report", "Folder for the report files.", path="folder")
    per_class: bool = flag(
        False, "Also tabulate each class: AP (detection), IoU (segmentation), top-1 (labels); depth: each depth range.", show_default=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple(self.runs))


@dataclass(frozen=True)
class RunsConfig:
    """``fcache runs [FOLDER...]``: where to look for RUN folders and when an unfinished one counts as stopped."""

    folders: tuple[str, ...] = (".",)
    stale_after: float = flag(
        600, "Seconds without a change after which an unfinished run counts as stopped (at least 3 logging gaps).", min=0
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "folders", tuple(self.folders) or (".",))
        check_flags(self)


@dataclass(frozen=True)
class SweepConfig:
    """``fcache sweep``: the SPEC file, the output folder (``""``: the spec's) and where variants run."""

    spec: str
    out: str = flag("", "Folder for runs/ and results.* [default: SPEC's out key].", show_default=False)
    cluster: str = flag("", "local:N: one variant per worker of a local dask cluster of N processes.", show_default=False)
    scheduler: str = flag("", "tcp://HOST:PORT: one variant per worker thread of a running dask cluster.", show_default=False)
    device: str = flag("", f"Where every variant trains: {DEVICE_HELP} [default: SPEC's device key, else auto]", show_default=False)

    def __post_init__(self) -> None:
        self.target()
        if self.device:
            from fcache.common.devices import resolve_device

            resolve_device(self.device)

    def target(self, threads: int = 0) -> Any:
        """Where the variants run (``fcache.common.cluster.ClusterTarget``): one per single-threaded worker of a local
        cluster or of the scheduler's; None: in this process."""
        from fcache.common.cluster import parse_target

        return parse_target(self.cluster, self.scheduler, threads_per_worker=1, torch_threads=threads)
