"""The head-training loop, one function (``train_pass``) read top to bottom like nanoGPT's train.py: for each batch,
each head's iteration: get_lr, the micro-steps and the optimiser step (``train_step``), EMA, log, evaluate, checkpoint;
for one head or many. State passes as arguments: a ``Head`` is what trains and where it writes (fixed for the pass),
its ``HeadState`` where it stands (iterations done, the RNG state of its next step, its logging window, why it left).

One read pass trains any number of heads on each batch (DINOv2's linear-evaluation trick, for whole heads): one
loader reads the union of the heads' levels once per batch; each head then takes its own step on its own levels,
with its own optimiser, schedule, checkpoint, metrics and RUN folder. A head's randomness (init, dropout, RPN / RoI
sampling) comes from its own RNG state, swapped in around its step (``rng_scope``), so every head follows
bit-exactly (on CPU) the trajectory it follows when trained alone, and resumes so: the batch order is a pure function
of (seed, iteration) and every RNG state is checkpointed. Training one head is the pass with one head (under torchrun, its DDP
wrapper). The loop consumes a map-style Dataset of items shaped like ``FeatureDataset`` items (``index``, ``view``,
``features``, ``geometry``, ``targets``), so a test can feed it features computed online.

An iteration is one optimiser step on ``batch_size x grad_accum`` samples, read as one batch and cut into
``grad_accum`` micro-batches whose gradients add up (``train_step``); with ``--ema`` the moving average follows every
step. A head with a validation store is evaluated on its cadence (``validation.py``) from the RNG state its step left,
which is what the head keeps, so evaluating never changes what it trains; the best evaluation is kept as
best.safetensors and ``--patience`` stops a head early. Everything a resumed run needs (EMA, gradient scaler, best
metric, patience count) is in its checkpoints.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset
from tqdm import tqdm

from fcache.common.devices import peak_memory_gb
from fcache.common.errors import DivergedError, InputError
from fcache.common.rng import RngState, rng_scope, rng_state, seeded_state
from fcache.spec import LevelSpec
from fcache.store.transit import Buffers
from fcache.train_heads import distributed as ddp
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.data import train_loader
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.loggers import RunLog
from fcache.train_heads.optim import autocast, ema_model, grad_scaler, no_sync
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.schedule import get_lr
from fcache.train_heads.task import Batch, Task
from fcache.train_heads.validation import Validation


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; as in nanoGPT, weight decay on matrices and conv kernels only (not on norms, biases, fusion weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass
class TrainResult:
    start: int
    stop: int
    seconds: float
    samples: int
    final_loss: float | None  # mean loss of the last logging window; None when no iteration ran
    losses: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] | None = None  # metrics of the last evaluation
    best: dict[str, Any] | None = None  # the best evaluation: metric, value, iter
    early_stop: str = ""  # why the head stopped before its last iteration ('' when it did not)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def build_model(task: Task, levels: tuple[LevelSpec, ...], seed: int) -> nn.Module:
    """The task's head, initialised from ``seed`` (the process's generators are left as they were)."""
    with rng_scope(seed=seed):
        return task.build(levels)


class Meter:
    """Averages a head's step values over a logging window; logs one record per window (``log``: metrics.jsonl and
    the rest). ``samples_per_s`` counts training time only: time spent evaluating is taken out (``pause``)."""

    def __init__(self, log: Callable[[dict[str, Any]], None], device: str = "cpu") -> None:
        self.log, self.device = log, device
        self.t0 = self.t_window = time.perf_counter()
        self.paused = 0.0
        self.sums: dict[str, float] = {}
        self.steps = self.samples = self.window_samples = 0
        self.last: dict[str, float] = {}
        self.rate = 0.0

    def add(self, values: Mapping[str, float], samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples
        self.window_samples += samples

    def pause(self, seconds: float) -> None:
        self.t_window += seconds
        self.paused += seconds

    def flush(self, iteration: int, lr: float) -> None:
        now = time.perf_counter()
        self.rate = self.window_samples / max(now - self.t_window, 1e-9)
        self.last = {k: v / self.steps for k, v in self.sums.items()}
        peak = round(peak_memory_gb(self.device), 3)  # fcache.common.devices says what it measures on CUDA and on the CPU
        self.log({"iter": iteration, "lr": lr, "samples_per_s": round(self.rate, 3), "time_s": round(now - self.t0 - self.paused, 3),
                  "peak_mem_gb": peak, **self.last})  # fmt: skip
        self.sums, self.steps, self.window_samples, self.t_window = {}, 0, 0, now


@dataclass(frozen=True)
class Head:
    """One head of a pass, fixed while it trains: what it trains on which levels, where it writes, how it is evaluated.
    (Its weights, optimiser, EMA and evaluation record change inside those objects; where it stands is its ``HeadState``.)"""

    cfg: TrainConfig
    task: Task
    levels: tuple[str, ...]  # the stored levels it reads from each batch
    model: nn.Module
    net: nn.Module  # what takes the step: ``model``, or its DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None  # the moving average of ``model`` (--ema)
    run: RunDir
    logs: RunLog
    validation: Validation | None

    @property
    def weights(self) -> nn.Module:
        """What is evaluated and saved as the head's weights: the moving average with --ema, else the model."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class HeadState:
    """Where a head stands: the iterations done, the RNG state its next step starts from, its logging window, and why
    it left the pass before its last iteration."""

    start: int  # the iteration it (re)started from
    at: int  # iterations done
    rng: RngState
    meter: Meter
    stopped: str = ""  # --patience stopped it (kept in its checkpoints)
    error: str = ""  # its loss diverged (its last checkpoint is kept; the other heads go on)

    @property
    def active(self) -> bool:
        return not (self.error or self.stopped)


def start_head(
    cfg: TrainConfig,
    task: Task,
    model: nn.Module,
    levels: Sequence[str],
    run: RunDir,
    checkpoint: Mapping[str, Any] | None,
    dist: ddp.Dist = ddp.SINGLE,
    *,
    validation: Validation | None = None,
) -> tuple[Head, HeadState]:
    """A head ready to train: from ``checkpoint``, or with its RNG seeded by ``cfg.seed`` (+ the rank under torchrun)."""
    device = torch.device(cfg.device)
    model.to(device).train()
    net = ddp.wrap(model, dist, device)  # ``model`` itself for one process
    optimizer = make_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.precision)
    ema = ema_model(model, cfg.ema) if cfg.ema is not None else None
    if checkpoint is None:
        start, rng, stopped = 0, seeded_state(cfg.seed + dist.rank), ""
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        if validation is not None and "validation" in checkpoint:
            validation.load(checkpoint["validation"])
        start, rng, stopped = int(checkpoint["iteration"]), ddp.own_rng(checkpoint, dist), str(checkpoint.get("stopped", ""))
    logs = RunLog.open(run, cfg.logger, start, main=dist.is_main)
    head = Head(cfg, task, tuple(levels), model, net, optimizer, scaler, ema, run, logs, validation)
    state = HeadState(start, start, rng, Meter(logs.log, cfg.device), stopped=stopped)
    return head, state


def train_pass(
    heads: Sequence[Head], states: Sequence[HeadState], data: Dataset, *, progress: bool = True, dist: ddp.Dist = ddp.SINGLE
) -> list[TrainResult]:
    """Train every head on each batch of ``data`` (items with the union of the heads' levels), read once. Top to bottom
    as nanoGPT's train.py: each batch, each head's iteration under its own RNG state: lr, the micro-steps and the
    optimiser step (``train_step``), EMA, log, evaluate, checkpoint.

    The pass starts at the earliest head's iteration; a head resumed further on joins when the pass reaches it. A head
    whose loss diverges leaves the pass (``HeadState.error``), and so does one that stops early; the others go on. With
    ``dist`` of several processes (one head) each rank trains on its slice of every batch; rank 0 logs, evaluates and
    checkpoints.
    """
    cfg, device = heads[0].cfg, torch.device(heads[0].cfg.device)  # what decides the batches is every head's (check_shared)
    start, stop = pass_range(cfg, states, data, dist)
    batches = train_loader(data, heads[0].task, batch_size=cfg.samples_per_iter, seed=cfg.seed, start=start, stop=stop,
                           num_workers=cfg.num_workers, prefetch=cfg.prefetch, device=device, rank=dist.rank, world=dist.world,
                           read_ahead=cfg.read_ahead)  # fmt: skip
    bar = progress_bar(heads, cfg.iters, start, shown=progress and dist.is_main)
    buffers = Buffers()  # each level's float32 features, decoded into the same memory every batch (CPU)
    t0 = time.perf_counter()
    try:
        with bar:  # closed before anything is said about an interruption
            for it, batch in zip(range(start, stop), batches, strict=True):
                batch = batch.to(device, buffers)  # stored values -> float32 on the device: the step's first operation
                for h, s in zip(heads, states, strict=True):
                    if it < s.start or not s.active:
                        continue
                    with rng_scope(s.rng):  # the head's own generators: it trains as it would alone
                        lr = get_lr(it, h.cfg)
                        for group in h.optimizer.param_groups:
                            group["lr"] = lr
                        try:  # the micro-steps (--grad-accum) and the optimiser step
                            losses = train_step(h.net, h.optimizer, h.task, levels_of(batch, h.levels), h.cfg, device, it, scaler=h.scaler)
                        except DivergedError as e:
                            diverged(h, s, e, it, dist)
                            continue
                        if h.ema is not None:
                            h.ema.update_parameters(h.model)
                        s.meter.add(ddp.mean(losses, dist, device), len(batch.index) * dist.world)
                        s.rng, s.at = rng_state(), it + 1  # where its next step starts from, whatever evaluating draws
                        if dist.is_main and (s.at % h.cfg.log_every == 0 or s.at == stop):
                            s.meter.flush(s.at, lr)
                        evaluating = evaluate(h, s, lr, dist)  # on its cadence; --patience may stop it
                        if s.at % h.cfg.checkpoint_every == 0 or s.at == stop or s.stopped:
                            save_checkpoint(h, s, lr, dist)
                    for other in states:  # samples/s and time_s count training only
                        other.meter.pause(evaluating)
                bar.update(1)
                if len(heads) == 1:
                    bar.set_postfix(progress_values(states[0].meter, heads[0].validation, get_lr(it, cfg)), refresh=False)
                if not any(s.active for s in states):
                    break
        for h, s in zip(heads, states, strict=True):
            evaluate_finished(h, s, dist)
    finally:
        for h in heads:
            h.logs.close()
    seconds = time.perf_counter() - t0
    return [result(h, s, seconds) for h, s in zip(heads, states, strict=True)]


def pass_range(cfg: TrainConfig, states: Sequence[HeadState], data: Dataset, dist: ddp.Dist) -> tuple[int, int]:
    """The iterations the pass runs: from the earliest active head's to ``--iters`` (or ``--stop-at``)."""
    if len(data) == 0:  # type: ignore[arg-type]
        raise InputError("the training set is empty")
    ddp.check_batch(cfg.batch_size, dist)
    stop = min(cfg.iters, cfg.stop_at or cfg.iters)
    return min((s.start for s in states if s.active), default=stop), stop


def progress_bar(heads: Sequence[Head], total: int, start: int, *, shown: bool) -> tqdm:
    what = heads[0].task.name if len(heads) == 1 else f"{len(heads)} heads"
    return tqdm(total=total, initial=start, desc=f"train {what}", unit="it", file=sys.stderr, disable=not shown)


def levels_of(batch: Batch, levels: Sequence[str]) -> Batch:
    """``batch`` with the features of ``levels`` only (the head's own, of the union the pass reads)."""
    return dataclasses.replace(batch, features={lv: batch.features[lv] for lv in levels})


def diverged(h: Head, s: HeadState, e: DivergedError, it: int, dist: ddp.Dist) -> None:
    """The head leaves the pass; its last checkpoint is kept."""
    s.error = str(e)
    if dist.is_main:  # what `fcache runs` reads; a resume from the last checkpoint truncates it away
        h.logs.log({"event": "diverged", "iter": it + 1, "error": s.error})


def evaluate(h: Head, s: HeadState, lr: float, dist: ddp.Dist) -> float:
    """Evaluate the head when its cadence says so (rank 0) and stop it when --patience is exhausted; the seconds it took."""
    v = h.validation
    if v is None or not v.due(s.at, h.cfg.iters):
        return 0.0
    t = time.perf_counter()
    if dist.is_main:
        evaluate_head(h, s.at)
    exhausted = v.exhausted and s.at < h.cfg.iters
    s.stopped = ddp.from_main(v.stop_reason() if exhausted else "", dist)
    seconds = time.perf_counter() - t
    if s.stopped and dist.is_main:
        if s.meter.steps:
            s.meter.flush(s.at, lr)
        h.logs.log({"event": "early_stop", "iter": s.at, "reason": s.stopped})
    return seconds


def evaluate_head(h: Head, at: int) -> None:
    """Score the head's weights on its validation store now; best.safetensors when they are the best so far."""
    v = cast(Validation, h.validation)
    metrics = v.evaluate(h.weights, at, h.logs)
    h.model.train()
    if v.record(metrics, at) and v.keep_best:
        h.run.save_best(h.weights.state_dict(), at, v.metric, cast(float, v.best))


def evaluate_finished(h: Head, s: HeadState, dist: ddp.Dist) -> None:
    """A head whose training is complete is evaluated at its last iteration, if it was not (e.g. resumed with a
    --val-store it did not have), from the RNG state its last step left."""
    v = h.validation
    if v is not None and dist.is_main and s.active and s.at == h.cfg.iters and v.last_iter != s.at:
        with rng_scope(s.rng):
            evaluate_head(h, s.at)


def save_checkpoint(h: Head, s: HeadState, lr: float, dist: ddp.Dist) -> None:
    """A checkpoint of the head at its iteration (rank 0 writes it, with every rank's RNG state)."""
    state = checkpoint_state(s.at, h.model, h.optimizer, lr, ddp.gather(s.rng, dist))
    if h.scaler.is_enabled():
        state["scaler"] = h.scaler.state_dict()
    if h.ema is not None:
        state["ema"] = h.ema.state_dict()
    if h.validation is not None:
        state["validation"] = h.validation.state()
    if s.stopped:
        state["stopped"] = s.stopped
    if dist.is_main:
        h.run.save_checkpoint(state, weights=h.weights.state_dict() if h.ema is not None else None, keep=h.cfg.keep_last)


def progress_values(meter: Meter, validation: Validation | None, lr: float) -> dict[str, str]:
    """The progress bar's postfix: the last logging window's loss and samples/s, the lr, the last evaluation's metric."""
    out = {}
    if meter.last:
        out = {"loss": f"{meter.last['loss']:.4f}", "samples_s": f"{meter.rate:.1f}", "lr": f"{lr:.2e}"}
    v = validation
    if v is not None and v.metric in v.last:
        out[v.metric] = f"{v.last[v.metric]:.4f}"
    return out


def result(h: Head, s: HeadState, seconds: float) -> TrainResult:
    v = h.validation
    evaluated = v is not None and v.last_iter > 0
    return TrainResult(s.start, s.at, seconds, s.meter.samples, s.meter.last.get("loss"), dict(s.meter.last),
                       eval=dict(v.last) if v is not None and evaluated else None, best=v.summary() if v is not None else None,
                       early_stop=s.stopped)  # fmt: skip


def train(
    cfg: TrainConfig,
    task: Task,
    model: nn.Module,
    data: Dataset,
    run: RunDir,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    progress: bool = True,
    dist: ddp.Dist = ddp.SINGLE,
) -> TrainResult:
    """Train one head on ``data`` for ``cfg.iters`` iterations (or ``cfg.epochs`` of ``data``; until ``cfg.stop_at``), from
    ``checkpoint`` when given: the pass with one head. Its items must hold the levels the model reads (all of ``data``'s
    levels are given to it)."""
    cfg = with_defaults(cfg).resolved(len(data))  # type: ignore[arg-type]
    head, state = start_head(cfg, task, model, tuple(_item_levels(data)), run, checkpoint, dist)
    (result,) = train_pass([head], [state], data, progress=progress, dist=dist)
    if state.error:
        raise DivergedError(state.error)
    return result


def _item_levels(data: Dataset) -> list[str]:
    levels = getattr(data, "levels", None)
    if levels is None:
        levels = list(data[0]["features"])  # a dataset of another kind: the levels its items carry
    return list(levels)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    batch: Batch,
    cfg: TrainConfig,
    device: torch.device,
    it: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One optimisation step on ``batch``, in ``cfg.grad_accum`` micro-batches: each one's loss (divided by their
    number) back-propagated, under ``cfg.precision``'s autocast, then one (clipped, scaled) optimiser step.

    Returns the loss components averaged over the micro-batches (plus ``loss``, and ``grad_norm`` when clipping).
    """
    scaler = scaler or grad_scaler(device, cfg.precision)
    micro = batch.chunks(cfg.grad_accum)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    total = 0.0
    for k, part in enumerate(micro):
        with no_sync(model, sync=k == len(micro) - 1):  # DDP all-reduces the summed gradients once
            with autocast(device, cfg.precision):
                losses = task.loss(model, part)
            loss = torch.stack([v.float() for v in losses.values()]).sum()
            if not torch.isfinite(loss):
                raise DivergedError(f"the loss is not finite at iteration {it + 1} ({float(loss.detach())}); lower --lr, or add --clip 1.0")
            scaler.scale(loss if len(micro) == 1 else loss / len(micro)).backward()
        for name, v in losses.items():
            sums[name] = sums.get(name, 0.0) + float(v.detach())
        total += float(loss.detach())
    out = {k: v / len(micro) for k, v in sums.items()}
    if cfg.clip is not None:
        scaler.unscale_(optimizer)
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
    scaler.step(optimizer)
    scaler.update()
    out["loss"] = total / len(micro)
    return out


def checkpoint_state(
    iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, rngs: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A checkpoint; ``rngs`` holds every rank's RNG state (one for a single process, kept as ``rng``)."""
    state = {
        "iteration": iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"iteration": iteration, "lr": lr},
        "rng": rngs[0],
    }
    return state | ({"rng_ranks": list(rngs)} if len(rngs) > 1 else {})
