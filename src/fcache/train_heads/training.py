"""``fcache train-head`` and ``fcache eval``: from stores to the loop, with the TASKS table.

Everything is validated (store fits the task and head, training set not empty, RUN folder free or resumable)
before the first byte is written into RUN.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fcache import store as fstore
from fcache.common.errors import InputError
from fcache.spec import GEOMETRY_FIELDS, LevelSpec
from fcache.store import FeatureStore
from fcache.train_heads import distributed as ddp
from fcache.train_heads.classification import task as classification
from fcache.train_heads.config import EvalConfig, TrainConfig
from fcache.train_heads.detection.task import DetectionTask, check_eval_store
from fcache.train_heads.loop import Task, TrainResult, build_model, evaluate, resolve_device, train, trainable_parameters
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.segmentation import task as segmentation
from fcache.train_heads.video import task as video


@dataclass(frozen=True)
class TaskDef:
    """How one task is made from a store + head spec, rebuilt from a run's config.json, and checked against an eval store."""

    from_store: Callable[[FeatureStore, str], Task]
    from_description: Callable[[Mapping[str, Any]], Task]
    check_eval_store: Callable[[Any, FeatureStore], None]
    defaults: Callable[[str], Mapping[str, Any]] = lambda head: {}  # head spec -> TrainConfig fields; {}: TrainConfig's own


TASKS: dict[str, TaskDef] = {
    "detection": TaskDef(DetectionTask.from_store, DetectionTask.from_description, check_eval_store),
    "segmentation": TaskDef(
        segmentation.SegmentationTask.from_store,
        segmentation.SegmentationTask.from_description,
        segmentation.check_eval_store,
        segmentation.train_defaults,
    ),
    "video": TaskDef(video.VideoTask.from_store, video.VideoTask.from_description, video.check_eval_store, video.train_defaults),
    "classification": TaskDef(
        classification.ClassificationTask.from_store,
        classification.ClassificationTask.from_description,
        classification.check_eval_store,
        classification.train_defaults,
    ),
}


def _task_def(name: str) -> TaskDef:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def task_defaults(task: str, head: str) -> dict[str, Any]:
    """Training hyper-parameters of ``task``'s ``head`` where no flag sets them (paper Tables 11-13; detection: TrainConfig's)."""
    return dict(_task_def(task).defaults(head))


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


def echo(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Prepared:
    """A training run checked against its inputs, with nothing written yet."""

    store: FeatureStore
    task: Task
    levels: tuple[LevelSpec, ...]
    indices: np.ndarray
    val: FeatureStore | None
    model: Any
    params: int


def prepare_training(cfg: TrainConfig) -> Prepared:
    """Open the stores, fit the task and head to them, pick the samples, build the model. Raises ValueError/StoreError."""
    store = fstore.open(cfg.store)
    tdef = _task_def(cfg.task)
    task = tdef.from_store(store, cfg.head)
    levels = task.levels(store.levels)
    indices = train_indices(store, cfg.train_fraction, cfg.seed)
    val = fstore.open(cfg.val_store) if cfg.val_store else None
    if val is not None:
        tdef.check_eval_store(task, val)
        check_levels(val, levels)
        eval_data(val, task, levels)
    resolve_device(cfg.device)
    model = build_model(task, levels, cfg.seed)
    return Prepared(store, task, levels, indices, val, model, trainable_parameters(model))


def training_data(p: Prepared, seed: int, levels: Sequence[str] | None = None) -> Any:
    """The store's Dataset of the chosen samples; with several training views, one drawn per sample and epoch.

    ``levels=()`` gives the same items without features (for features computed online).
    """
    views = p.store.manifest.train_views
    view = "random" if len(views) > 1 else 0
    names = [lv.name for lv in p.levels] if levels is None else list(levels)
    return p.store.dataset(names, indices=p.indices.tolist(), view=view, views=views, seed=seed, targets=p.task.target_names)


def training_record(cfg: TrainConfig, p: Prepared) -> dict[str, Any]:
    """What RUN/config.json holds for ``cfg`` (already ``resolved``): the identity of the run and what it trains."""
    return {
        "config": cfg.to_dict(),
        "store_fingerprint": p.store.manifest.fingerprint,
        "task": p.task.describe(),
        "levels": [lv.to_dict() for lv in p.levels],
        "trainable_params": p.params,
        "train_samples": len(p.indices),
    }


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
    return _evaluate_into(run, p.task, p.model, p.val, p.levels, cfg.batch_size, cfg.num_workers, cfg.device, result.stop, progress)


def run_train(cfg: TrainConfig, *, progress: bool = True, say: Callable[[str], None] = echo) -> dict[str, Any]:
    """Train one head as ``cfg`` says, evaluate it on ``cfg.val_store`` when the run is complete; returns the summary.

    Under torchrun (WORLD_SIZE > 1) every process trains its slice of each batch; rank 0 writes RUN and evaluates.
    """
    dist = ddp.Dist.from_env()
    with ddp.process_group(dist, cfg.device):
        p = prepare_training(cfg)
        ddp.check_batch(cfg.batch_size, dist)
        cfg = cfg.resolved(len(p.indices))  # warm-up given in epochs -> iterations of this training set
        record = training_record(cfg, p)
        run = RunDir(cfg.out)
        checkpoint = ddp.on_main(lambda: run.begin(record, resume=cfg.resume), dist)
        if not dist.is_main and cfg.resume:
            checkpoint = run.load_checkpoint()
        if dist.is_main:
            on = f" on {dist.world} processes" if dist.enabled else ""
            say(f"{cfg.task} head {record['task']['head']}: {p.params:,} trainable parameters, {len(p.indices)} training samples{on}")
        result = train(cfg, p.task, p.model, training_data(p, cfg.seed), run, checkpoint=checkpoint, progress=progress, dist=dist)
        summary = train_summary(cfg, p, run, result) | ({"processes": dist.world} if dist.enabled else {})
        metrics = evaluate_finished(cfg, p, run, result, progress) if dist.is_main else None
    return summary | ({"eval": metrics} if metrics is not None else {})


def check_plain_view(store: FeatureStore) -> None:
    """Evaluation reads view 0, which must be the plain resize + pad of every sample (no crop, no flip, longest side fits)."""
    g = store.geometry_array[store.ok_indices, 0]  # (n, len(GEOMETRY_FIELDS))
    f = {name: g[:, k] for k, name in enumerate(GEOMETRY_FIELDS)}
    fits = np.isclose(f["scale"] * np.maximum(f["orig_h"], f["orig_w"]), f["canvas"], rtol=1e-3)
    plain = (f["crop_x0"] == 0) & (f["crop_y0"] == 0) & (f["flip"] == 0) & fits
    if not plain.all():
        raise InputError(
            f"{store.root}: view 0 of {int((~plain).sum())} sample(s) is a random crop or flip, not the plain resize + pad; "
            "evaluate on a store extracted with --views 1"
        )


def eval_data(store: FeatureStore, task: Task, levels: tuple[LevelSpec, ...]) -> Any:
    if len(store.ok_indices) == 0:
        raise InputError(f"{store.root} has no usable samples to evaluate on")
    if not store.video:  # a video view is a clip x crop by construction
        check_plain_view(store)
    if hasattr(task, "eval_dataset"):  # a task that scores more than view 0 (segmentation: ms+flip over the test views)
        return task.eval_dataset(store, levels)
    return store.dataset([lv.name for lv in levels], view=0, targets=task.target_names)


def _evaluate_into(
    run: RunDir,
    task: Task,
    model: Any,
    store: FeatureStore,
    levels: tuple[LevelSpec, ...],
    batch_size: int,
    num_workers: int,
    device: str,
    iteration: int,
    progress: bool,
) -> dict[str, float]:
    """Score ``model`` on view 0 of every ok sample of ``store``; prediction files go into RUN, the metrics into metrics.jsonl."""
    data = eval_data(store, task, levels)
    metrics = evaluate(
        task, model, data, batch_size=batch_size, num_workers=num_workers, device=resolve_device(device), out=run.path, progress=progress
    )
    run.log({"event": "eval", "iter": iteration, "store": str(store.root), "samples": len(data), **metrics})
    return metrics


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Score the weights in RUN on the store ``cfg.store``; writes RUN/detections.json (detection) and logs the metrics."""
    run = RunDir(cfg.run)
    record = run.require_config()
    tdef = _task_def(record["config"]["task"])
    task = tdef.from_description(record["task"])
    levels = tuple(LevelSpec.from_dict(d) for d in record["levels"])
    store = fstore.open(cfg.store)
    tdef.check_eval_store(task, store)
    check_levels(store, levels)
    n = len(eval_data(store, task, levels))
    resolve_device(cfg.device)
    state, iteration = run.load_model()
    model = build_model(task, levels, seed=0)
    model.load_state_dict(state)
    metrics = _evaluate_into(run, task, model, store, levels, cfg.batch_size, cfg.num_workers, cfg.device, iteration, progress)
    return {"run": str(run.path), "store": str(store.root), "iter": iteration, "samples": n, "metrics": metrics}


def load_trained(run_path: str, store_path: str) -> tuple[Task, tuple[LevelSpec, ...], Any, FeatureStore, int]:
    """The task, levels and trained model of RUN, and ``store`` checked to fit them: (task, levels, model, store, iteration)."""
    run = RunDir(run_path)
    record = run.require_config()
    tdef = _task_def(record["config"]["task"])
    task = tdef.from_description(record["task"])
    levels = tuple(LevelSpec.from_dict(d) for d in record["levels"])
    store = fstore.open(store_path)
    tdef.check_eval_store(task, store)
    check_levels(store, levels)
    state, iteration = run.load_model()
    model = build_model(task, levels, seed=0)
    model.load_state_dict(state)
    return task, levels, model, store, iteration
