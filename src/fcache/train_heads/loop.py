"""The head-training loop shared by every task, readable top to bottom like nanoGPT's: get_lr, step, log, checkpoint.

It consumes a map-style Dataset of items shaped like ``FeatureDataset`` items (``index``, ``view``, ``features``,
``geometry``, ``targets``), so a test can feed it features computed online; the store is just the default source.
Everything task-specific sits behind :class:`Task`. On CPU a run is deterministic, and resuming from a checkpoint
continues bit-exactly: the batch order is a pure function of (seed, iteration) and every RNG state is checkpointed.
Under torchrun each rank trains on its slice of every global batch (``distributed.py``); several heads in one read
pass have their own driver (``multihead.py``) built from the same parts.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from fcache.common.errors import DivergedError, InputError
from fcache.spec import Geometry, LevelSpec
from fcache.train_heads import distributed as ddp
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.schedule import get_lr


@dataclass
class Batch:
    """Collated items: features stacked per level, the rest per sample."""

    index: list[int]
    view: list[int]
    features: dict[str, Tensor]  # level -> (B, C, H, W)
    geometry: list[Geometry]
    targets: list[Any]  # task-specific training targets in view coordinates (empty when evaluating)
    raw: list[dict[str, Any]]  # each item's targets as read: the ground truth for evaluation

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        feats = {k: v.to(device, non_blocking=nb) for k, v in self.features.items()}
        targets = [_to(t, device) for t in self.targets]
        return Batch(self.index, self.view, feats, self.geometry, targets, self.raw)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=device.type == "cuda")
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


class Task(Protocol):
    """What the loop needs from a task (detection now; segmentation, video, classification later)."""

    name: str
    target_names: tuple[str, ...]  # store targets every item must carry

    def levels(self, available: Sequence[LevelSpec]) -> tuple[LevelSpec, ...]:
        """The stored levels the head reads; ValueError when the head cannot run on ``available``."""
        ...

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module: ...

    def targets(self, item: Mapping[str, Any], geometry: Geometry) -> Any:
        """Training targets of one item in its view's coordinates (runs in DataLoader workers)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]: ...

    def predict(self, model: nn.Module, batch: Batch) -> list[Any]:
        """One prediction per sample, in original-sample coordinates."""
        ...

    def evaluate(self, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any], out: Path | None) -> dict[str, float]:
        """Metrics of ``predictions`` against the ground truth in ``raw``; writes prediction files into ``out``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON that, with the head spec, rebuilds this task for evaluation (written into config.json)."""
        ...


@dataclass
class Collate:
    """DataLoader collate_fn: items -> Batch (task targets computed in the worker)."""

    task: Task
    with_targets: bool = True

    def __call__(self, items: list[Mapping[str, Any]]) -> Batch:
        geometry = [Geometry.from_array(np.asarray(it["geometry"])) for it in items]
        features = {lv: torch.stack([it["features"][lv] for it in items]) for lv in items[0]["features"]}
        targets = [self.task.targets(it, g) for it, g in zip(items, geometry, strict=True)] if self.with_targets else []
        raw = [dict(it.get("targets", {})) for it in items]
        return Batch([int(it["index"]) for it in items], [int(it["view"]) for it in items], features, geometry, targets, raw)


class EpochItems(Dataset):
    """Item ``(epoch, j)`` is ``data[j]`` as seen in ``epoch`` (``set_epoch`` picks its view). Stateless across workers."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, j = key
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        return self.data[j]


class TrainBatches(Sampler[list[tuple[int, int]]]):
    """Batches ``start..stop-1`` of the stream made of one seeded permutation per epoch, cut into full batches.

    Batch ``it`` holds stream positions ``it*B .. it*B+B-1``; position p is item ``perm(seed, p // n)[p % n]``
    of epoch ``p // n``. A resumed run starts at its iteration without reading what came before. With ``world``
    processes, rank r takes the r-th of ``world`` equal consecutive slices of each batch (B must divide evenly).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, *, rank: int = 0, world: int = 1) -> None:
        assert batch_size % world == 0, "ddp.check_batch refuses uneven slices first"
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n))
        return self._perm[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch_size // self.world
        for it in range(self.start, self.stop):
            first = it * self.batch_size + self.rank * local
            positions = range(first, first + local)
            yield [(p // self.n, int(self._order(p // self.n)[p % self.n])) for p in positions]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


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
    """Averages step values over a logging window; writes one metrics.jsonl record and the progress postfix per window."""

    def __init__(self, run: RunDir, bar: tqdm) -> None:
        self.run, self.bar = run, bar
        self.t0 = self.t_window = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.steps = self.samples = self.window_samples = 0
        self.last: dict[str, float] = {}

    def add(self, values: Mapping[str, float], samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples
        self.window_samples += samples
        self.bar.update(1)

    def flush(self, iteration: int, lr: float) -> None:
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.t_window, 1e-9)
        self.last = {k: v / self.steps for k, v in self.sums.items()}
        self.run.log({"iter": iteration, "lr": lr, "samples_per_s": round(rate, 3), "time_s": round(now - self.t0, 3), **self.last})
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", samples_s=f"{rate:.1f}", lr=f"{lr:.2e}")
        self.sums, self.steps, self.window_samples, self.t_window = {}, 0, 0, now


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
    """Train ``model`` on ``data`` for ``cfg.iters`` iterations (or until ``cfg.stop_at``), from ``checkpoint`` when given.

    With ``dist`` of several processes each rank trains on its slice of every batch; rank 0 logs and checkpoints.
    """
    if len(data) == 0:  # type: ignore[arg-type]
        raise InputError("the training set is empty")
    ddp.check_batch(cfg.batch_size, dist)
    device = resolve_device(cfg.device)
    model.to(device).train()
    net = ddp.wrap(model, dist, device)  # ``model`` itself for one process
    optimizer = make_optimizer(model, cfg)
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(ddp.own_rng(checkpoint, dist))
        start = int(checkpoint["iteration"])
    else:
        torch.manual_seed(cfg.seed + dist.rank)
    stop = min(cfg.iters, cfg.stop_at or cfg.iters)
    loader = DataLoader(
        EpochItems(data),
        batch_sampler=TrainBatches(len(data), cfg.batch_size, cfg.seed, start, stop, rank=dist.rank, world=dist.world),  # type: ignore[arg-type]
        collate_fn=Collate(task, with_targets=True),
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch if cfg.num_workers else None,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched by loader start-up
    )
    show = progress and dist.is_main
    bar = tqdm(total=cfg.iters, initial=start, desc=f"train {task.name}", unit="it", file=sys.stderr, disable=not show)
    meter = Meter(run, bar)
    for it, batch in zip(range(start, stop), loader, strict=True):
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = train_step(net, optimizer, task, batch.to(device), cfg, device, it)
        meter.add(ddp.mean(losses, dist, device), len(batch.index) * dist.world)
        if dist.is_main and ((it + 1) % cfg.log_every == 0 or it + 1 == stop):
            meter.flush(it + 1, lr)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == stop:
            state = checkpoint_state(it + 1, model, optimizer, lr, ddp.gather(rng_state(), dist))
            if dist.is_main:
                run.save_checkpoint(state)
    bar.close()
    seconds = time.perf_counter() - meter.t0
    return TrainResult(start, stop, seconds, meter.samples, meter.last.get("loss"), dict(meter.last))


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


@torch.inference_mode()
def predict_all(
    task: Task, model: nn.Module, data: Dataset, *, batch_size: int, num_workers: int, device: torch.device, progress: bool = True
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every item's raw targets and the task's prediction, in dataset order."""
    model.to(device).eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=Collate(task, with_targets=False), num_workers=num_workers)
    raw: list[dict[str, Any]] = []
    predictions: list[Any] = []
    for batch in tqdm(loader, desc=f"eval {task.name}", unit="batch", file=sys.stderr, disable=not progress):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predictions += task.predict(model, batch.to(device))
        raw += batch.raw
    return raw, predictions


def evaluate(
    task: Task,
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    out: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Predict every item of ``data`` and score the predictions with the task's metric."""
    raw, predictions = predict_all(task, model, data, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    return task.evaluate(raw, predictions, out)
