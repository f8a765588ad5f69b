"""``fcache eval`` and every evaluation: a trained head rebuilt from its RUN folder, predictions, the task's metric.

:func:`load_trained` is the one way a RUN's head comes back (eval, cka): its task from the recorded description,
its weights from ``model.safetensors``, the evaluation store checked to fit it: the task's own check, the levels,
and the frozen backbone (:func:`check_same_backbone`: features of another model, weights, input size, normalisation
or random seed are refused, naming the fields that differ). How the store keeps its values (its stored form: fp16,
int8, ...) is no part of that: a head evaluates on any form of its backbone's features, and says which it read
(:func:`stored_form`). Prediction files and metrics of each evaluation store go into ``RUN/eval/<store name>/``
(``RunDir.eval_dir``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fcache.common.devices import resolve_device
from fcache.common.errors import InputError
from fcache.common.files import check_writable, write_json
from fcache.spec import LevelSpec
from fcache.store import FeatureStore
from fcache.store.info import forms_text
from fcache.store.readahead import READ_AHEAD
from fcache.train_heads.config import EvalConfig
from fcache.train_heads.data import Collate, InOrder, eval_data
from fcache.train_heads.loop import build_model
from fcache.train_heads.optim import autocast
from fcache.train_heads.runfolder import EVAL_METRICS, RunDir
from fcache.train_heads.runrecord import EvalRecord, FeatureSource, TrainingRecord, identity_differences
from fcache.train_heads.task import Task
from fcache.train_heads.tasks import task_def


def check_levels(store: FeatureStore, levels: tuple[LevelSpec, ...]) -> None:
    """``store`` holds every level the head reads, with the same channels and stride."""
    have = {lv.name: lv for lv in store.levels}
    missing = [lv.name for lv in levels if lv.name not in have]
    if missing:
        raise InputError(f"{store.root} lacks level(s) {', '.join(missing)} that the head reads (it holds {', '.join(have)})")
    differ = [
        f"{lv.name} {have[lv.name].channels}ch/{have[lv.name].stride} != {lv.channels}ch/{lv.stride}"
        for lv in levels
        if have[lv.name] != lv
    ]
    if differ:
        raise InputError(
            f"{store.root} has other features than the head was trained on ({'; '.join(differ)}); use a store of the same backbone"
        )


def check_same_backbone(features: FeatureSource | None, store: FeatureStore, levels: tuple[LevelSpec, ...]) -> None:
    """``store`` holds features of the frozen backbone the head was trained on (a run that does not record it: unchecked)."""
    if features is None:
        return
    m = store.manifest
    diffs = identity_differences((m.backbone, m.preprocessing), (features.backbone, features.preprocessing), levels)
    if diffs:
        raise InputError(
            f"{store.root} holds features of another backbone than the head was trained on ({'; '.join(diffs)}; store != run); "
            "extract it with the training store's --model, --weights/--random-init, --seed and --input-size"
        )


def stored_form(store: FeatureStore, levels: tuple[LevelSpec, ...]) -> str:
    """The stored form the head's levels are read in: its name (``int8``), or each level's and the budget they were
    chosen for (``p3 int3, p5 int4 (chosen for --max-error 0.25)``)."""
    return forms_text(store.manifest.storage.to_dict(), [lv.name for lv in levels])


@torch.inference_mode()
def predict_all(
    task: Task,
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool = True,
    precision: str = "auto",
    read_ahead: int = READ_AHEAD,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every item's raw targets and the task's prediction, in dataset order (under ``precision``'s autocast); from a
    store in object storage ``read_ahead`` range requests kept in flight across batches."""
    model.to(device).eval()
    items = InOrder(data, batch_size, read_ahead)
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=Collate(task, with_targets=False), num_workers=num_workers,
                        pin_memory=device.type == "cuda")  # fmt: skip
    raw: list[dict[str, Any]] = []
    predictions: list[Any] = []
    try:
        for batch in tqdm(loader, desc=f"eval {task.name}", unit="batch", file=sys.stderr, disable=not progress):
            with autocast(device, precision):
                predictions += task.predict(model, batch.to(device))
            raw += batch.raw
    finally:
        items.close()
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
    precision: str = "auto",
    read_ahead: int = READ_AHEAD,
) -> dict[str, float]:
    """Predict every item of ``data`` and score the predictions with the task's metric."""
    raw, predictions = predict_all(task, model, data, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                                   precision=precision, read_ahead=read_ahead)  # fmt: skip
    return task.evaluate(raw, predictions, out)


def evaluate_into(
    run: RunDir,
    task: Task,
    model: nn.Module,
    store: FeatureStore,
    levels: tuple[LevelSpec, ...],
    batch_size: int,
    num_workers: int,
    device: str,
    iteration: int,
    progress: bool,
    *,
    precision: str = "auto",
    log: Callable[[dict[str, Any]], None] | None = None,
    read_ahead: int = READ_AHEAD,
) -> dict[str, float]:
    """Score ``model`` on ``store`` as its task evaluates; prediction files and metrics.json go into RUN/eval/<store>,
    the metrics also into metrics.jsonl (with the store they come from; ``log``: also elsewhere, e.g. TensorBoard)."""
    data = eval_data(store, task, levels, task_def(task.name).eval_views)
    out = run.eval_dir(store.root, store.manifest.fingerprint)
    metrics = evaluate(
        task, model, data, batch_size=batch_size, num_workers=num_workers, device=torch.device(resolve_device(device)), out=out,
        progress=progress, precision=precision, read_ahead=read_ahead,
    )  # fmt: skip
    samples = len(data)  # type: ignore[arg-type]
    record = EvalRecord(iter=iteration, store=str(store.root), samples=samples, eval_dir=str(out.relative_to(run.path)), metrics=metrics,
                        form=stored_form(store, levels))  # fmt: skip
    write_json(out / EVAL_METRICS, record.to_dict())
    (log or run.log)(record.logged())
    return metrics


@dataclass
class Trained:
    """A RUN's head with its weights, and a store checked to fit it."""

    run: RunDir
    task: Task
    levels: tuple[LevelSpec, ...]
    model: nn.Module
    store: FeatureStore
    iteration: int


@dataclass
class Head:
    """A RUN's record and its trained head, rebuilt without any store."""

    run: RunDir
    record: TrainingRecord
    task: Task
    model: nn.Module
    iteration: int


def load_head(run_path: str | Path) -> Head:
    """The record, task and trained model of RUN (weights from model.safetensors), in eval mode on the CPU."""
    run = RunDir(run_path)
    record = run.require_config()
    task = task_def(record.config.task).from_description(record.task)
    state, iteration = run.load_model()
    model = build_model(task, record.levels, seed=0)
    model.load_state_dict(state)
    return Head(run, record, task, model.eval(), iteration)


def load_trained(run_path: str | Path, store_path: str | Path, access: Mapping[str, Any] | None = None) -> Trained:
    """The task, levels and trained model of RUN, and ``store`` (opened with ``access``: ``fcache.store.open``'s
    storage options and cache) checked to fit them."""
    run = RunDir(run_path)
    record = run.require_config()
    tdef = task_def(record.config.task)
    task = tdef.from_description(record.task)
    store = FeatureStore(store_path, **(access or {}))
    tdef.check_eval_store(task, store)
    check_levels(store, record.levels)
    check_same_backbone(record.features, store, record.levels)
    head = load_head(run_path)
    return Trained(run, head.task, record.levels, head.model, store, head.iteration)


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Score the weights in RUN on the store ``cfg.store``; writes the task's prediction files into RUN, logs the metrics."""
    check_writable(cfg.run, "RUN", fix="evaluation writes into RUN/eval/ and RUN/metrics.jsonl: copy the RUN folder somewhere writable")
    t = load_trained(cfg.run, cfg.store, cfg.open_kwargs())
    n = len(eval_data(t.store, t.task, t.levels, task_def(t.task.name).eval_views))  # type: ignore[arg-type]
    resolve_device(cfg.device)
    precision = t.run.require_config().config.precision
    metrics = evaluate_into(t.run, t.task, t.model, t.store, t.levels, cfg.batch_size, cfg.num_workers, cfg.device, t.iteration, progress,
                            precision=precision)  # fmt: skip
    out = t.run.eval_dir(t.store.root, t.store.manifest.fingerprint)
    summary = {"run": str(t.run.path), "task": t.task.name, "store": str(t.store.root), "form": stored_form(t.store, t.levels),
               "iter": t.iteration, "samples": n}  # fmt: skip
    return summary | {"out": str(out), "metrics": metrics}
