"""``fcache train-head``: from stores and flags to the loop, for one head, several in one read pass, or one under torchrun.

Every head is validated (store fits the task and head, training set not empty, RUN folder free or resumable, logger
and precision available) before the first byte is written into any RUN folder. Several heads train in one read pass
of the store, each into ``OUT/<its canonical head spec>``, each exactly as if trained alone (``loop.train_pass``).
With a validation store each head is evaluated on its cadence and when complete (``validation.Validation``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcache.common.command import rerun
from fcache.common.devices import resolve_device
from fcache.common.errors import DivergedError, InputError, Interrupted
from fcache.common.files import check_writable
from fcache.spec import LevelSpec
from fcache.store import FeatureStore
from fcache.train_heads import distributed as ddp
from fcache.train_heads.checkpoints import BEST
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.data import eval_data, training_items
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.evaluation import check_levels, check_same_backbone, evaluate_into
from fcache.train_heads.loggers import RunLog, resolve_logger
from fcache.train_heads.loop import Head, HeadState, TrainResult, build_model, start_head, train_pass, trainable_parameters
from fcache.train_heads.optim import check_precision
from fcache.train_heads.runfolder import CONFIG, RunDir
from fcache.train_heads.runlease import RunLease
from fcache.train_heads.runrecord import FeatureSource, TrainingRecord
from fcache.train_heads.task import Task
from fcache.train_heads.tasks import task_def
from fcache.train_heads.validation import Validation

# Fields every head of one pass shares: they decide which batches are read (and when the pass stops).
SHARED = ("store", "task", "iters", "epochs", "batch_size", "grad_accum", "seed", "train_fraction", "stop_at", "num_workers",
          "prefetch", "device")  # fmt: skip


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


def check_batch(cfg: TrainConfig, samples: int, usable: int) -> None:
    """Refuse a batch larger than the training set of ``samples`` (of ``usable`` in the store): it would hold every
    sample many times over in one step, and its reading alone fills the memory. Refused, not capped: the batch size is
    the run's (its record, schedule and learning rate follow it), and what was meant is the user's to say."""
    if cfg.batch_size is None or cfg.batch_size <= samples:
        return
    subset = f", --train-fraction {cfg.train_fraction:g} of {usable}" if samples < usable else ""
    raise InputError(
        f"--batch-size {cfg.batch_size} is larger than the training set ({samples} samples{subset}); give --batch-size {samples} or less"
    )


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
        return TrainingRecord.new(cfg, self.store.manifest, self.task.describe(), self.levels, self.params, len(self.indices))


def prepare_training(cfg: TrainConfig, stores: dict[str, FeatureStore] | None = None) -> Prepared:
    """Open the stores, fit the task and head to them, pick the samples, build the model. Raises FcacheError.

    ``stores``: stores already open, by path; those opened here are added (a sweep opens each store once).
    """
    tdef = task_def(cfg.task)
    tdef.parse(cfg.head)  # flags first: a bad head, device, precision or logger is named before any store is opened
    check_precision(torch.device(resolve_device(cfg.device)), cfg.precision)
    resolve_logger(cfg.logger)
    opened = {} if stores is None else stores
    store = _open(cfg.store, opened, cfg)
    task = tdef.from_store(store, cfg.head)
    levels = task.levels(store.levels)
    indices = train_indices(store, cfg.train_fraction, cfg.seed)
    val = _open(cfg.val_store, opened, cfg) if cfg.val_store else None
    if val is not None:
        tdef.check_eval_store(task, val)
        check_levels(val, levels)
        check_same_backbone(FeatureSource.of(store.manifest), val, levels)
        eval_data(val, task, levels, tdef.eval_views)
    if not (cfg.resume and (Path(cfg.out) / CONFIG).is_file()):  # a RUN an earlier release trained so resumes as it was
        check_batch(cfg, len(indices), len(store.ok_indices))
    model = build_model(task, levels, cfg.seed)
    return Prepared(store, task, levels, indices, val, model, trainable_parameters(model))


def _open(path: str, opened: dict[str, FeatureStore], cfg: TrainConfig) -> FeatureStore:
    if path not in opened:
        opened[path] = FeatureStore(path, **cfg.open_kwargs())
    return opened[path]


def training_data(p: Prepared, seed: int, levels: Sequence[str] | None = None) -> Any:
    """The training items of ``p`` (``levels``: those read, default the head's; ``()`` for features computed online)."""
    names = [lv.name for lv in p.levels] if levels is None else list(levels)
    return training_items(p.store, p.task, p.indices, names, seed)


def train_summary(cfg: TrainConfig, p: Prepared, run: RunDir, result: TrainResult) -> dict[str, Any]:
    """The summary ``fcache train-head`` prints (as JSON with --json) for one head: with a validation store also the
    last evaluation (``eval``), the best one (``best``: metric, value, iter) and the file holding its weights
    (``best_weights``: None with --no-keep-best), and whether patience stopped it early."""
    summary = {
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
        "stopped_early": bool(result.early_stop),
    }
    summary |= {"early_stop": result.early_stop} if result.early_stop else {}
    summary |= {"eval": result.eval} if result.eval is not None else {}
    if result.best is None:
        return summary
    kept = cfg.keep_best and result.best["value"] is not None
    return summary | {"best": result.best, "best_weights": str(run.path / BEST) if kept else None}


def validation(cfg: TrainConfig, p: Prepared) -> Validation | None:
    """The evaluations of a head during and at the end of its training (None without a validation store)."""
    if p.val is None:
        return None
    val, tdef = p.val, task_def(cfg.task)

    def evaluate(model: nn.Module, iteration: int, logs: RunLog) -> dict[str, float]:
        metrics = evaluate_into(logs.run, p.task, model, val, p.levels, cfg.batch_size, cfg.num_workers, cfg.device, iteration, False,
                                precision=cfg.precision, log=logs.log, read_ahead=cfg.read_ahead)  # fmt: skip
        if logs.sink is not None:
            logs.pictures(iteration, tdef.pictures(logs.run.eval_dir(val.root, val.manifest.fingerprint)))
        return metrics

    return Validation(evaluate, cfg.eval_interval(len(p.indices)), tdef.main_metric, tdef.higher_is_better, cfg.patience, cfg.keep_best)


def warmup_warning(cfg: TrainConfig) -> str:
    """A warning when the warm-up does not fit in the run (the learning rate would never reach --lr); '' when it does."""
    if cfg.warmup <= cfg.iters:
        return ""
    reached = cfg.warmup_factor + (1 - cfg.warmup_factor) * (cfg.iters - 1) / cfg.warmup  # at the last iteration
    return (
        f"warning: the warm-up ({cfg.warmup} iterations) is longer than the run ({cfg.iters}): the learning rate never reaches "
        f"--lr {cfg.lr:g} (the warm-up ends at {100 * reached:.0f}% of it); give --warmup below {cfg.iters}, or train longer"
    )


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


def run_folders(heads: Sequence[tuple[Path, str, str]]) -> list[Path]:
    """The RUN folder of each head of one pass, given as (parent folder, spec as typed, canonical spec): the typed spec
    made filesystem-safe (``bifpn:layers=3`` -> ``bifpn_layers-3``; the full spec is in its config.json), with a digest
    of the canonical spec where heads would share that name. Where only the canonical spec's folder exists (an earlier
    release named every folder so), that one: a resume finds it."""
    typed = [out / folder_name(t) for out, t, _ in heads]
    folders = []
    for folder, (out, _, canonical) in zip(typed, heads, strict=True):
        full = out / folder_name(canonical)
        if full.exists() and not folder.exists():
            folders.append(full)
        elif typed.count(folder) > 1:
            folders.append(folder.with_name(f"{folder.name}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"))
        else:
            folders.append(folder)
    return folders


def _prepare(cfgs: Sequence[TrainConfig], own_folders: bool) -> list[tuple[TrainConfig, Prepared, TrainingRecord]]:
    """Each head checked against the stores and its RUN folder named (:func:`run_folders` when ``own_folders``)."""
    prepared = [(cfg, prepare_training(cfg)) for cfg in cfgs]
    reads = sorted({p.task.target_names for _, p in prepared})
    if len(reads) > 1:
        raise InputError(
            f"heads trained in one pass read the same targets, these read {' vs '.join('+'.join(r) for r in reads)}; "
            "train them in separate runs"
        )
    canonical = [p.task.describe()["head"] for _, p in prepared]
    twice = sorted({c for c in canonical if canonical.count(c) > 1})
    if twice:
        raise InputError(f"a head is given twice ({', '.join(twice)}, spelled out); give each head once")
    if own_folders:
        folders = run_folders([(Path(cfg.out), cfg.head, c) for cfg, c in zip(cfgs, canonical, strict=True)])
        prepared = [(dataclasses.replace(cfg, out=str(f)), p) for (cfg, p), f in zip(prepared, folders, strict=True)]
    out = []
    for cfg, p in prepared:
        cfg = cfg.resolved(len(p.indices))  # warm-up given in epochs -> iterations of this training set
        out.append((cfg, p, p.record(cfg)))
    return out


def _check_folders(prepared: Sequence[tuple[TrainConfig, Prepared, TrainingRecord]], dist: ddp.Dist) -> None:
    """Each RUN folder writable, free or resumable as asked; a checkpoint of another number of processes is refused."""
    for cfg, _, record in prepared:
        check_writable(cfg.out, "--out")
        checkpoint = RunDir(cfg.out).check(record, resume=cfg.resume)
        if checkpoint is not None:
            ddp.own_rng(checkpoint, dist)


def interrupted_message(heads: Sequence[Head], states: Sequence[HeadState]) -> str:
    """What an interrupted training pass kept in each RUN folder (its newest checkpoint on disk) and the command that
    continues it."""
    kept = []
    for h, s in zip(heads, states, strict=True):
        total = min(h.cfg.iters, h.cfg.stop_at or h.cfg.iters)
        saved = h.run.checkpoints()  # what is on disk: the interruption may have come during a save
        at = f"stopped at iteration {max([s.at] + [k for k, _ in saved])} of {total}"
        kept.append(f"{at}, {saved[-1][1]} (iteration {saved[-1][0]}) kept" if saved else f"{at}, no checkpoint in {h.run.path} yet")
    return f"{'; '.join(kept)}; continue with: {rerun(add=('--resume',))}"


def run_train(cfg: TrainConfig, *, progress: bool = True, say: Callable[[str], None] = echo) -> dict[str, Any]:
    """Train one head as ``cfg`` says (its unset hyper-parameters: the task's and head's defaults), evaluate it on
    ``cfg.val_store`` (every ``eval_every`` and when the run is complete); returns the summary.

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


def _take_leases(prepared: Sequence[tuple[TrainConfig, Prepared, TrainingRecord]], leases: contextlib.ExitStack) -> None:
    """Take the RUN lease of every folder (one process trains into a RUN at a time), released when ``leases`` closes."""
    for cfg, _, _ in prepared:
        leases.enter_context(RunLease(cfg.out))


def _run(cfgs: Sequence[TrainConfig], *, own_folders: bool, progress: bool, say: Callable[[str], None]) -> list[dict[str, Any]]:
    cfgs = [with_defaults(c) for c in cfgs]
    check_shared(cfgs)
    dist = ddp.Dist.from_env()
    with ddp.process_group(dist, cfgs[0].device), contextlib.ExitStack() as leases:
        prepared = _prepare(cfgs, own_folders)
        ddp.check_batch(cfgs[0].batch_size, dist)
        ddp.on_main(functools.partial(_check_folders, prepared, dist), dist)  # every folder checked before any is written
        ddp.on_main(functools.partial(_take_leases, prepared, leases), dist)
        heads, states = [], []
        for cfg, p, record in prepared:
            run = RunDir(cfg.out)
            checkpoint = ddp.on_main(functools.partial(run.begin, record, resume=cfg.resume), dist)
            if not dist.is_main and cfg.resume:
                checkpoint = run.load_checkpoint()
            if dist.is_main:
                on = f" on {dist.world} processes" if dist.enabled else ""
                where = f" -> {run.path}" if own_folders else ""
                say(f"{cfg.task} head {record.head}: {p.params:,} trainable parameters, {len(p.indices)} training samples{on}{where}")
                if warmup_warning(cfg):
                    say(warmup_warning(cfg))
            device = resolve_device(cfg.device)
            head, state = start_head(dataclasses.replace(cfg, device=device), p.task, p.model, [lv.name for lv in p.levels], run,
                                     checkpoint, dist, validation=validation(cfg, p))  # fmt: skip
            heads.append(head)
            states.append(state)
        union = sorted({lv for _, p, _ in prepared for lv in p.levels}, key=lambda lv: lv.stride)
        cfg, first, _ = prepared[0]
        try:
            results = train_pass(heads, states, training_data(first, cfg.seed, [lv.name for lv in union]), progress=progress, dist=dist)
        except KeyboardInterrupt:
            raise Interrupted(interrupted_message(heads, states)) from None
        summaries = [
            train_summary(cfg, p, h.run, result) | ({"processes": dist.world} if dist.enabled else {})
            for (cfg, p, _), h, result in zip(prepared, heads, results, strict=True)
        ]
    failed = [f"{h.run.path.name}: {s.error}" for h, s in zip(heads, states, strict=True) if s.error]
    if len(failed) == len(heads) == 1:
        raise DivergedError(states[0].error)
    if failed:
        raise DivergedError(f"{len(failed)} of {len(heads)} heads stopped ({'; '.join(failed)}); the others finished")
    return summaries
