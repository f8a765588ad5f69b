"""The head-training loop, readable top to bottom like nanoGPT's: get_lr, step, log, checkpoint; for one head or many.

One read pass trains any number of heads on each batch (DINOv2's linear-evaluation trick, for whole heads): one
loader reads the union of the heads' levels once per batch; each head then takes its own step on its own levels,
with its own optimiser, schedule, checkpoint, metrics and RUN folder. A head's randomness (init, dropout, RPN / RoI
sampling) comes from its own RNG state, swapped in around its step, so every head follows bit-exactly (on CPU) the
trajectory it follows when trained alone, and resumes so: the batch order is a pure function of (seed, iteration)
and every RNG state is checkpointed. Training one head is the pass with one head (under torchrun, its DDP
wrapper). The loop consumes a map-style Dataset of items shaped like ``FeatureDataset`` items (``index``, ``view``,
``features``, ``geometry``, ``targets``), so a test can feed it features computed online.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from fcache.common.devices import peak_memory_gb
from fcache.common.errors import DivergedError, InputError
from fcache.spec import LevelSpec
from fcache.train_heads import distributed as ddp
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.data import train_loader
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.schedule import get_lr
from fcache.train_heads.task import Batch, Task


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


def rng_state() -> dict[str, Any]:
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class TrainResult:
    start: int
    stop: int
    seconds: float
    samples: int
    final_loss: float | None  # mean loss of the last logging window; None when no iteration ran
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def build_model(task: Task, levels: tuple[LevelSpec, ...], seed: int) -> nn.Module:
    """The task's head, initialised from ``seed``."""
    torch.manual_seed(seed)
    return task.build(levels)


class Meter:
    """Averages a head's step values over a logging window; writes one metrics.jsonl record per window."""

    def __init__(self, run: RunDir, device: str = "cpu") -> None:
        self.run, self.device = run, device
        self.t0 = self.t_window = time.perf_counter()
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

    def flush(self, iteration: int, lr: float) -> None:
        now = time.perf_counter()
        self.rate = self.window_samples / max(now - self.t_window, 1e-9)
        self.last = {k: v / self.steps for k, v in self.sums.items()}
        peak = round(peak_memory_gb(self.device), 3)  # fcache.common.devices says what it measures on CUDA and on the CPU
        self.run.log({"iter": iteration, "lr": lr, "samples_per_s": round(self.rate, 3), "time_s": round(now - self.t0, 3),
                      "peak_mem_gb": peak, **self.last})  # fmt: skip
        self.sums, self.steps, self.window_samples, self.t_window = {}, 0, 0, now


@dataclass
class HeadRun:
    """One head of a pass: what it trains, where it writes, and its own optimiser and RNG state."""

    cfg: TrainConfig
    task: Task
    model: nn.Module
    net: nn.Module  # what takes the step: ``model``, or its DDP wrapper under torchrun
    levels: tuple[str, ...]
    run: RunDir
    optimizer: torch.optim.Optimizer
    start: int
    rng: dict[str, Any]
    meter: Meter
    error: str = ""  # why the head left the pass (its loss diverged); the others go on
    at: int = 0  # iterations done


def start_head(
    cfg: TrainConfig,
    task: Task,
    model: nn.Module,
    levels: Sequence[str],
    run: RunDir,
    checkpoint: Mapping[str, Any] | None,
    dist: ddp.Dist = ddp.SINGLE,
) -> HeadRun:
    """A head ready to train: from ``checkpoint``, or with its RNG seeded by ``cfg.seed`` (+ the rank under torchrun)."""
    device = torch.device(cfg.device)
    model.to(device).train()
    net = ddp.wrap(model, dist, device)  # ``model`` itself for one process
    optimizer = make_optimizer(model, cfg)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, rng = int(checkpoint["iteration"]), ddp.own_rng(checkpoint, dist)
    else:
        torch.manual_seed(cfg.seed + dist.rank)
        start, rng = 0, rng_state()
    return HeadRun(cfg, task, model, net, tuple(levels), run, optimizer, start, rng, Meter(run, cfg.device), at=start)


def train_pass(heads: Sequence[HeadRun], data: Dataset, *, progress: bool = True, dist: ddp.Dist = ddp.SINGLE) -> list[TrainResult]:
    """Train every head on each batch of ``data`` (items with the union of the heads' levels), read once.

    The pass starts at the earliest head's iteration; a head resumed further on joins when the pass reaches it.
    A head whose loss diverges leaves the pass (``HeadRun.error``, its last checkpoint kept); the others go on.
    With ``dist`` of several processes (one head) each rank trains on its slice of every batch; rank 0 logs and
    checkpoints.
    """
    if len(data) == 0:  # type: ignore[arg-type]
        raise InputError("the training set is empty")
    cfg = heads[0].cfg  # fields that decide the batches are equal in every head (training.check_shared)
    ddp.check_batch(cfg.batch_size, dist)
    device = torch.device(cfg.device)
    start, stop = min(h.start for h in heads), min(cfg.iters, cfg.stop_at or cfg.iters)
    loader = train_loader(data, heads[0].task, batch_size=cfg.batch_size, seed=cfg.seed, start=start, stop=stop,
                          num_workers=cfg.num_workers, prefetch=cfg.prefetch, device=device, rank=dist.rank, world=dist.world)  # fmt: skip
    t0 = time.perf_counter()
    what = heads[0].task.name if len(heads) == 1 else f"{len(heads)} heads"
    bar = tqdm(total=cfg.iters, initial=start, desc=f"train {what}", unit="it", file=sys.stderr, disable=not (progress and dist.is_main))
    with bar:  # closed before anything is said about an interruption
        for it, batch in zip(range(start, stop), loader, strict=True):
            batch = batch.to(device)
            for h in heads:
                if it >= h.start and not h.error:
                    try:
                        head_step(h, batch, it, stop, device, dist)
                    except DivergedError as e:
                        h.error = str(e)
                        if dist.is_main:  # what `fcache runs` reads; a resume from the last checkpoint truncates it away
                            h.run.log({"event": "diverged", "iter": it + 1, "error": h.error})
            bar.update(1)
            if len(heads) == 1 and heads[0].meter.last:
                m = heads[0].meter
                bar.set_postfix(loss=f"{m.last['loss']:.4f}", samples_s=f"{m.rate:.1f}", lr=f"{get_lr(it, cfg):.2e}", refresh=False)
    seconds = time.perf_counter() - t0
    return [TrainResult(h.start, stop, seconds, h.meter.samples, h.meter.last.get("loss"), dict(h.meter.last)) for h in heads]


def head_step(h: HeadRun, batch: Batch, it: int, stop: int, device: torch.device, dist: ddp.Dist = ddp.SINGLE) -> None:
    """Iteration ``it`` of head ``h`` on its levels of ``batch``, under its own RNG state: step, log, checkpoint."""
    set_rng_state(h.rng)
    lr = get_lr(it, h.cfg)
    for group in h.optimizer.param_groups:
        group["lr"] = lr
    own = dataclasses.replace(batch, features={lv: batch.features[lv] for lv in h.levels})
    losses = train_step(h.net, h.optimizer, h.task, own, h.cfg, device, it)
    h.meter.add(ddp.mean(losses, dist, device), len(batch.index) * dist.world)
    if dist.is_main and ((it + 1) % h.cfg.log_every == 0 or it + 1 == stop):
        h.meter.flush(it + 1, lr)
    if (it + 1) % h.cfg.checkpoint_every == 0 or it + 1 == stop:
        state = checkpoint_state(it + 1, h.model, h.optimizer, lr, ddp.gather(rng_state(), dist))
        if dist.is_main:
            h.run.save_checkpoint(state)
    h.rng, h.at = rng_state(), it + 1


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
    """Train one head on ``data`` for ``cfg.iters`` iterations (or until ``cfg.stop_at``), from ``checkpoint`` when given:
    the pass with one head. Its items must hold the levels the model reads (all of ``data``'s levels are given to it)."""
    levels = tuple(_item_levels(data))
    head = start_head(cfg, task, model, levels, run, checkpoint, dist)
    (result,) = train_pass([head], data, progress=progress, dist=dist)
    if head.error:
        raise DivergedError(head.error)
    return result


def _item_levels(data: Dataset) -> list[str]:
    levels = getattr(data, "levels", None)
    if levels is None:
        levels = list(data[0]["features"])  # a dataset of another kind: the levels its items carry
    return list(levels)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, batch: Batch, cfg: TrainConfig, device: torch.device, it: int
) -> dict[str, float]:
    """One optimisation step; returns the loss components as floats (plus ``loss`` and ``grad_norm`` when clipping)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = task.loss(model, batch)
    loss = torch.stack([v.float() for v in losses.values()]).sum()
    if not torch.isfinite(loss):
        raise DivergedError(f"the loss is not finite at iteration {it + 1} ({float(loss.detach())}); lower --lr, or add --clip 1.0")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    out = {k: float(v.detach()) for k, v in losses.items()}
    if cfg.clip is not None:
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
    optimizer.step()
    out["loss"] = float(loss.detach())
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
