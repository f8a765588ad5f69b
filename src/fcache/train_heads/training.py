"""``fcache train-head``: from stores and flags to the loop, for one head, several in one read pass, or one under torchrun.

Every head is validated (store fits the task and head, training set not empty, RUN folder free or resumable) before
the first byte is written into any RUN folder. Several heads train in one read pass of the store, each into
``OUT/<its canonical head spec>``, each exactly as if trained alone (``loop.train_pass``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fcache import store as fstore
from fcache.common.command import rerun
from fcache.common.devices import resolve_device
from fcache.common.errors import DivergedError, InputError, Interrupted
from fcache.spec import LevelSpec
from fcache.store import FeatureStore
from fcache.train_heads import distributed as ddp
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.data import eval_data, training_items
from fcache.train_heads.evaluation import check_levels, evaluate_into
from fcache.train_heads.loop import HeadRun, TrainResult, build_model, start_head, train_pass, trainable_parameters
from fcache.train_heads.runfolder import CHECKPOINT, RunDir, TrainingRecord
from fcache.train_heads.task import Task
from fcache.train_heads.tasks import task_def

# Fields every head of one pass shares: they decide which batches are read (and when the pass stops).
SHARED = ("store", "task", "iters", "batch_size", "seed", "train_fraction", "stop_at", "num_workers", "prefetch", "device")


def echo(message: str) -> None:
    print(message, file=sys.stderr)


def train_indices(store: FeatureStore, fraction: float, seed: int) -> np.ndarray:
    """The ok samples to train on: all of them, or a seeded subset of ``round(fraction * n)`` (at least 1; Table 6)."""
    ok = store.ok_indices
    if len(ok) == 0:
        counts = ", ".join(f"{k}: {v}" for k, v in store.status_counts().items())
        raise InputError(f"{store.root} has no usable samples ({counts}); finish or rerun the extraction first")
    if fraction >= 1.0:
        return ok
    k = max(1, round(fraction * len(ok)))
    return np.sort(np.random.default_rng(seed).choice(ok, size=k, replace=False))


@dataclass
class Prepared:
    """A training run checked against its inputs, with nothing written yet."""

    store: FeatureStore
    task: Task
    levels: tuple[LevelSpec, ...]
    indices: np.ndarray
    val: FeatureStore | None
    model: nn.Module
    params: int

    def record(self, cfg: TrainConfig) -> TrainingRecord:
        """What RUN/config.json holds for ``cfg`` (already ``resolved``)."""
        return TrainingRecord(cfg, self.store.manifest.fingerprint, self.task.describe(), self.levels, self.params, len(self.indices))


def prepare_training(cfg: TrainConfig, stores: dict[str, FeatureStore] | None = None) -> Prepared:
    """Open the stores, fit the task and head to them, pick the samples, build the model. Raises FcacheError.

    ``stores``: stores already open, by path; those opened here are added (a sweep opens each store once).
    """
    tdef = task_def(cfg.task)
    tdef.parse(cfg.head)  # flags first: a bad head or device is named before any store is opened
    resolve_device(cfg.device)
    opened = {} if stores is None else stores
    store = _open(cfg.store, opened)
    task = tdef.from_store(store, cfg.head)
    levels = task.levels(store.levels)
    indices = train_indices(store, cfg.train_fraction, cfg.seed)
    val = _open(cfg.val_store, opened) if cfg.val_store else None
    if val is not None:
        tdef.check_eval_store(task, val)
        check_levels(val, levels)
        eval_data(val, task, levels, tdef.eval_views)
    model = build_model(task, levels, cfg.seed)
    return Prepared(store, task, levels, indices, val, model, trainable_parameters(model))


def _open(path: str, opened: dict[str, FeatureStore]) -> FeatureStore:
    if path not in opened:
        opened[path] = fstore.open(path)
    return opened[path]


def training_data(p: Prepared, seed: int, levels: Sequence[str] | None = None) -> Any:
    """The training items of ``p`` (``levels``: those read, default the head's; ``()`` for features computed online)."""
    names = [lv.name for lv in p.levels] if levels is None else list(levels)
    return training_items(p.store, p.task, p.indices, names, seed)


def train_summary(cfg: TrainConfig, p: Prepared, run: RunDir, result: TrainResult) -> dict[str, Any]:
    """The summary ``fcache train-head`` prints (as JSON with --json) for one head."""
    return {
        "run": str(run.path),
        "task": cfg.task,
        "head": p.task.describe()["head"],
        "trainable_params": p.params,
        "train_samples": len(p.indices),
        "iters": {"start": result.start, "stop": result.stop, "total": cfg.iters},
        "seconds": round(result.seconds, 3),
        "samples_per_s": round(result.samples_per_s, 3),
        "final_loss": result.final_loss,
        "losses": result.losses,
    }


def evaluate_finished(cfg: TrainConfig, p: Prepared, run: RunDir, result: TrainResult, progress: bool) -> dict[str, float] | None:
    """Score the head on ``cfg.val_store`` when its training is complete (None otherwise)."""
    if p.val is None or result.stop != cfg.iters:
        return None
    return evaluate_into(run, p.task, p.model, p.val, p.levels, cfg.batch_size, cfg.num_workers, cfg.device, result.stop, progress)


def folder_name(head: str) -> str:
    """A head spec made filesystem-safe: ``bifpn:channels=256,layers=3`` -> ``bifpn_channels-256_layers-3``."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", head.replace("=", "-"))


def check_shared(cfgs: Sequence[TrainConfig]) -> None:
    """Heads trained in one pass read the same batches: the SHARED fields must agree."""
    for name in SHARED:
        values = {repr(getattr(c, name)) for c in cfgs}
        if len(values) > 1:
            raise InputError(
                f"heads trained in one pass must share {name.replace('_', '-')} (got {', '.join(sorted(values))}); "
                f"give --{name.replace('_', '-')} explicitly, or train those heads in separate runs"
            )


def _prepare(cfgs: Sequence[TrainConfig], own_folders: bool) -> list[tuple[TrainConfig, Prepared, TrainingRecord]]:
    """Each head checked against the stores and its RUN folder named (``OUT/<canonical head>`` when ``own_folders``)."""
    out = []
    for cfg in cfgs:
        p = prepare_training(cfg)
        if own_folders:
            cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / folder_name(p.task.describe()["head"])))
        cfg = cfg.resolved(len(p.indices))  # warm-up given in epochs -> iterations of this training set
        out.append((cfg, p, p.record(cfg)))
    names = [cfg.out for cfg, _, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"a head is given twice ({', '.join(Path(n).name for n in twice)}); give each head once")
    return out


def _check_folders(prepared: Sequence[tuple[TrainConfig, Prepared, TrainingRecord]], dist: ddp.Dist) -> None:
    """Each RUN folder free or resumable as asked; a checkpoint of another number of processes is refused."""
    for cfg, _, record in prepared:
        checkpoint = RunDir(cfg.out).check(record, resume=cfg.resume)
        if checkpoint is not None:
            ddp.own_rng(checkpoint, dist)


def interrupted_message(heads: Sequence[HeadRun]) -> str:
    """What an interrupted training pass kept in each RUN folder and the command that continues it."""
    kept = []
    for h in heads:
        total = min(h.cfg.iters, h.cfg.stop_at or h.cfg.iters)
        at = f"stopped at iteration {h.at} of {total}"
        ckpt = f"{h.run.path / CHECKPOINT} (iteration {h.saved})" if h.saved else f"no checkpoint in {h.run.path} yet"
        kept.append(f"{at}, {ckpt} kept" if h.saved else f"{at}, {ckpt}")
    return f"{'; '.join(kept)}; continue with: {rerun(add=('--resume',))}"


def run_train(cfg: TrainConfig, *, progress: bool = True, say: Callable[[str], None] = echo) -> dict[str, Any]:
    """Train one head as ``cfg`` says, evaluate it on ``cfg.val_store`` when the run is complete; returns the summary.

    Under torchrun (WORLD_SIZE > 1) every process trains its slice of each batch; rank 0 writes RUN and evaluates.
    """
    (summary,) = _run([cfg], own_folders=False, progress=progress, say=say)
    return summary


def run_train_heads(cfgs: Sequence[TrainConfig], *, progress: bool = True, say: Callable[[str], None] = echo) -> list[dict[str, Any]]:
    """Train the heads of ``cfgs`` (one per head, same flags, ``out`` the parent folder) in one read pass.

    Every head is checked (stores, head spec, RUN folder) before anything is written; each is evaluated on
    ``val_store`` when its training is complete. Returns one ``train-head`` summary per head.
    """
    if ddp.Dist.from_env().enabled:
        raise InputError("torchrun trains one head on many processes; give one --head, or run several heads without torchrun")
    return _run(cfgs, own_folders=True, progress=progress, say=say)


def _run(cfgs: Sequence[TrainConfig], *, own_folders: bool, progress: bool, say: Callable[[str], None]) -> list[dict[str, Any]]:
    check_shared(cfgs)
    dist = ddp.Dist.from_env()
    with ddp.process_group(dist, cfgs[0].device):
        prepared = _prepare(cfgs, own_folders)
        ddp.check_batch(cfgs[0].batch_size, dist)
        ddp.on_main(functools.partial(_check_folders, prepared, dist), dist)  # every folder checked before any is written
        heads = []
        for cfg, p, record in prepared:
            run = RunDir(cfg.out)
            checkpoint = ddp.on_main(functools.partial(run.begin, record, resume=cfg.resume), dist)
            if not dist.is_main and cfg.resume:
                checkpoint = run.load_checkpoint()
            if dist.is_main:
                on = f" on {dist.world} processes" if dist.enabled else ""
                where = f" -> {run.path}" if own_folders else ""
                say(f"{cfg.task} head {record.head}: {p.params:,} trainable parameters, {len(p.indices)} training samples{on}{where}")
            device = resolve_device(cfg.device)
            heads.append(start_head(dataclasses.replace(cfg, device=device), p.task, p.model, [lv.name for lv in p.levels], run,
                                    checkpoint, dist))  # fmt: skip
        union = sorted({lv for _, p, _ in prepared for lv in p.levels}, key=lambda lv: lv.stride)
        cfg, first, _ = prepared[0]
        try:
            results = train_pass(heads, training_data(first, cfg.seed, [lv.name for lv in union]), progress=progress, dist=dist)
        except KeyboardInterrupt:
            raise Interrupted(interrupted_message(heads)) from None
        summaries = []
        for (cfg, p, _), h, result in zip(prepared, heads, results, strict=True):
            summary = train_summary(cfg, p, h.run, result) | ({"processes": dist.world} if dist.enabled else {})
            metrics = evaluate_finished(cfg, p, h.run, result, progress) if dist.is_main and not h.error else None
            summaries.append(summary | ({"eval": metrics} if metrics is not None else {}))
    failed = [f"{h.run.path.name}: {h.error}" for h in heads if h.error]
    if len(failed) == len(heads) == 1:
        raise DivergedError(heads[0].error)
    if failed:
        raise DivergedError(f"{len(failed)} of {len(heads)} heads stopped ({'; '.join(failed)}); the others finished")
    return summaries
