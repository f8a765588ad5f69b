"""Several heads trained in one read pass of the store: DINOv2's linear-evaluation trick (many classifiers on one
feature pass), here for whole heads. ``fcache train-head --head fpn --head bifpn:layers=3 ...`` runs this.

One DataLoader reads the union of the heads' levels once per batch; each head then takes its own step on its own
levels, with its own optimiser, schedule, checkpoint, metrics and RUN folder (``OUT/<canonical head spec>``). A head's
randomness (init, dropout, RPN / RoI sampling) comes from its own RNG state, swapped in around its step, so every head
follows bit-exactly (on CPU) the trajectory it follows when trained alone with the same seed and flags, and resumes so.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fcache.common.errors import DivergedError, InputError
from fcache.train_heads import distributed as ddp
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.loop import (
    Batch,
    Collate,
    EpochItems,
    Meter,
    Task,
    TrainBatches,
    TrainResult,
    checkpoint_state,
    make_optimizer,
    resolve_device,
    rng_state,
    set_rng_state,
    train_step,
)
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.schedule import get_lr
from fcache.train_heads.training import Prepared, echo, evaluate_finished, prepare_training, train_summary, training_data, training_record

# Fields every head of one pass shares: they decide which batches are read (and when the pass stops).
SHARED = ("store", "task", "iters", "batch_size", "seed", "train_fraction", "stop_at", "num_workers", "prefetch", "device")


def folder_name(head: str) -> str:
    """A head spec made filesystem-safe: ``bifpn:channels=256,layers=3`` -> ``bifpn_channels-256_layers-3``."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", head.replace("=", "-"))


@dataclass
class HeadRun:
    """One head of the pass: what it trains, where it writes, and its own optimiser and RNG state."""

    cfg: TrainConfig
    task: Task
    model: nn.Module
    levels: tuple[str, ...]
    run: RunDir
    optimizer: torch.optim.Optimizer
    start: int
    rng: dict[str, Any]
    meter: Meter
    error: str = ""  # why the head left the pass (its loss diverged); the others go on


def start_head(cfg: TrainConfig, p: Prepared, run: RunDir, checkpoint: dict[str, Any] | None) -> HeadRun:
    """A head ready to train, as ``loop.train`` starts one: from ``checkpoint``, or with the RNG seeded by ``cfg.seed``."""
    p.model.to(resolve_device(cfg.device)).train()
    optimizer = make_optimizer(p.model, cfg)
    if checkpoint is not None:
        p.model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, rng = int(checkpoint["iteration"]), ddp.own_rng(checkpoint, ddp.SINGLE)
    else:
        torch.manual_seed(cfg.seed)
        start, rng = 0, rng_state()
    meter = Meter(run, tqdm(disable=True))  # the pass shows one progress bar for all heads
    return HeadRun(cfg, p.task, p.model, tuple(lv.name for lv in p.levels), run, optimizer, start, rng, meter)


def train_heads(heads: Sequence[HeadRun], data: Dataset, *, progress: bool = True) -> list[TrainResult]:
    """Train every head on each batch of ``data`` (items with the union of the heads' levels), read once.

    The pass starts at the earliest head's iteration; a head resumed further on joins when the pass reaches it.
    A head whose loss diverges leaves the pass (``HeadRun.error``, its last checkpoint kept); the others go on.
    """
    cfg = heads[0].cfg  # the SHARED fields are equal in every head
    device = resolve_device(cfg.device)
    start, stop = min(h.start for h in heads), min(cfg.iters, cfg.stop_at or cfg.iters)
    loader = DataLoader(
        EpochItems(data),
        batch_sampler=TrainBatches(len(data), cfg.batch_size, cfg.seed, start, stop),  # type: ignore[arg-type]
        collate_fn=Collate(heads[0].task, with_targets=True),  # targets depend on the task and store, never on the head
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch if cfg.num_workers else None,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iters, initial=start, desc=f"train {len(heads)} heads", unit="it", file=sys.stderr, disable=not progress)
    for it, batch in zip(range(start, stop), loader, strict=True):
        batch = batch.to(device)
        for h in heads:
            if it >= h.start and not h.error:
                try:
                    head_step(h, batch, it, stop, device)
                except DivergedError as e:
                    h.error = str(e)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    return [TrainResult(h.start, stop, seconds, h.meter.samples, h.meter.last.get("loss"), dict(h.meter.last)) for h in heads]


def head_step(h: HeadRun, batch: Batch, it: int, stop: int, device: torch.device) -> None:
    """Iteration ``it`` of head ``h`` on its levels of ``batch``, under its own RNG state: step, log, checkpoint."""
    set_rng_state(h.rng)
    lr = get_lr(it, h.cfg)
    for group in h.optimizer.param_groups:
        group["lr"] = lr
    own = dataclasses.replace(batch, features={lv: batch.features[lv] for lv in h.levels})
    h.meter.add(train_step(h.model, h.optimizer, h.task, own, h.cfg, device, it), len(batch.index))
    if (it + 1) % h.cfg.log_every == 0 or it + 1 == stop:
        h.meter.flush(it + 1, lr)
    if (it + 1) % h.cfg.checkpoint_every == 0 or it + 1 == stop:
        h.run.save_checkpoint(checkpoint_state(it + 1, h.model, h.optimizer, lr, [rng_state()]))
    h.rng = rng_state()


def check_shared(cfgs: Sequence[TrainConfig]) -> None:
    """Heads trained in one pass read the same batches: the SHARED fields must agree."""
    for name in SHARED:
        values = {repr(getattr(c, name)) for c in cfgs}
        if len(values) > 1:
            raise InputError(
                f"heads trained in one pass must share {name.replace('_', '-')} (got {', '.join(sorted(values))}); "
                f"give --{name.replace('_', '-')} explicitly, or train those heads in separate runs"
            )


def _prepare(cfgs: Sequence[TrainConfig]) -> list[tuple[TrainConfig, Prepared, dict[str, Any]]]:
    """Each head checked against the stores, its RUN folder ``OUT/<canonical head>`` named and checked: nothing written."""
    out = []
    for cfg in cfgs:
        p = prepare_training(cfg)
        head = p.task.describe()["head"]
        cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / folder_name(head))).resolved(len(p.indices))
        out.append((cfg, p, training_record(cfg, p)))
    names = [cfg.out for cfg, _, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"a head is given twice ({', '.join(Path(n).name for n in twice)}); give each head once")
    for cfg, _, record in out:
        checkpoint = RunDir(cfg.out).check(record, resume=cfg.resume)
        if checkpoint is not None:
            ddp.own_rng(checkpoint, ddp.SINGLE)  # a checkpoint of a torchrun run resumes under torchrun only
    return out


def run_train_heads(cfgs: Sequence[TrainConfig], *, progress: bool = True, say: Callable[[str], None] = echo) -> list[dict[str, Any]]:
    """Train the heads of ``cfgs`` (one per head, same flags, ``out`` the parent folder) in one read pass.

    Every head is checked (stores, head spec, RUN folder) before anything is written; each is evaluated on
    ``val_store`` when its training is complete. Returns one ``train-head`` summary per head.
    """
    if ddp.Dist.from_env().enabled:
        raise InputError("torchrun trains one head on many processes; give one --head, or run several heads without torchrun")
    check_shared(cfgs)
    prepared = _prepare(cfgs)
    heads = []
    for cfg, p, record in prepared:
        run = RunDir(cfg.out)
        heads.append(start_head(cfg, p, run, run.begin(record, resume=cfg.resume)))
        say(f"{cfg.task} head {record['task']['head']}: {p.params:,} trainable parameters -> {run.path}")
    union = sorted({lv for _, p, _ in prepared for lv in p.levels}, key=lambda lv: lv.stride)
    cfg, first, _ = prepared[0]
    results = train_heads(heads, training_data(first, cfg.seed, [lv.name for lv in union]), progress=progress)
    summaries = []
    for (cfg, p, _), h, result in zip(prepared, heads, results, strict=True):
        summary = train_summary(cfg, p, h.run, result)
        metrics = evaluate_finished(cfg, p, h.run, result, progress) if not h.error else None
        summaries.append(summary | ({"eval": metrics} if metrics is not None else {}))
    failed = [f"{h.run.path.name}: {h.error}" for h in heads if h.error]
    if failed:
        raise DivergedError(f"{len(failed)} of {len(heads)} heads stopped ({'; '.join(failed)}); the others finished")
    return summaries
