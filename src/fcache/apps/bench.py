"""``fcache bench``: what the frozen setting and the cache save per iteration, for the three tasks of the paper's
Tables 7 (memory) and 8 (seconds per iteration): COCO detection, ADE20K segmentation, Kinetics-400 video; and for any
other task (depth, classification) with its own defaults (``TaskDef.bench``).

For one task, backbone, input size and batch, three settings, each in its own process so its peak memory is its own
(CUDA: max allocated; CPU: peak RSS of the measuring process):
  (a) store    - the frozen-setting head trained from a feature store (DataLoader over the store, as train-head does);
  (b) online   - the frozen backbone run on the batch's images (inference mode), then the same head's step;
  (c) finetune - the full-finetune head trained with the backbone: its forward and backward are part of the step,
                 AdamW updates it too.
Defaults are the paper's (``PAPER``, the tasks whose ``TaskDef.bench`` says so): the column titles of Tables 7/8 for the
heads (frozen: 5x BiFPN, 6x pixel decoder, 4x blocks, taken as ``global:blocks=4``; full finetune: FPN, 1x pixel decoder,
linear), their batch sizes, and the inputs of Tables 11-13 (detection 1024, segmentation 512, SwinV2-G 640, video 16
frames of 224). The store is synthetic (``bench_stores``): random features of the backbone's exact level shapes. With
``features_only`` only (a) runs, the backbone built on the meta device for its shapes, so a SwinV2-G-shaped head needs
no weights. A setting whose process raises or dies becomes an error row; the others still run. ``iters`` are timed
iterations after one warm-up (``fcache train-head --steps`` are learning-rate milestones, another thing).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcache.common.devices import DEVICE_HELP, resolve_device
from fcache.common.errors import InputError
from fcache.common.flags import flag
from fcache.extract.config import BackboneCompute, check_attention

SETTINGS = ("store", "online", "finetune")


def __getattr__(name: str) -> Any:
    """``PAPER``: task -> its ``BenchDef``, for the tasks of the paper's Tables 7/8 (read from TASKS when first asked:
    importing this module, as ``fcache --help`` does, imports no task)."""
    if name == "PAPER":
        from fcache.train_heads.tasks import TASKS

        return {name: t.bench for name, t in TASKS.items() if t.bench.paper}
    raise AttributeError(f"module 'fcache.apps.bench' has no attribute {name!r}")


@dataclass(frozen=True)
class BenchConfig(BackboneCompute):
    """``fcache bench`` flags; 0 and "" take the task's value for the backbone (the paper's where it has one: ``PAPER``)."""

    task: str = flag("detection", "The task whose heads are measured (Tables 7/8: detection, segmentation, video).",
                     choices="fcache.train_heads.tasks:TASKS")  # fmt: skip
    model: str = flag("swinv2-t", "Backbone whose features (or shapes) are used.")
    input_size: int = flag(0, "Canvas side [default: the paper's: detection 1024, segmentation 512 (swinv2-g 640), video 224].",
                           show_default=False)  # fmt: skip
    batch_size: int = flag(0, "Samples per iteration [default: the paper's: 16, swinv2-g 8; video 64, swinv2-l 32, swinv2-g 16].",
                           show_default=False)  # fmt: skip
    frames: int = flag(0, "video: frames per clip [default: 16].", show_default=False)
    head: str = flag("", "Frozen-setting head (rows store, online) [default: bifpn:layers=5, mask2former:pixel_blocks=6, "
                         "global:blocks=4].", show_default=False)  # fmt: skip
    finetune_head: str = flag("", "Head trained with the backbone (row finetune) [default: fpn, mask2former:pixel_blocks=1, linear].",
                              show_default=False)  # fmt: skip
    window: int = flag(0, "Attention window; 0: the model's own (swinv2-g: the paper's for the task).", show_default=False)
    iters: int = flag(3, "Timed iterations, after one warm-up.")
    device: str = flag("auto", DEVICE_HELP)
    features_only: bool = flag(False, "Only the from-store row, on features of the backbone's shapes: no weights needed.",
                               show_default=False)  # fmt: skip
    dtype: str = flag("fp16", "Stored feature dtype.", choices="fcache.store.dtypes:DTYPES")
    num_workers: int = flag(2, "DataLoader workers reading the store.")
    seed: int = flag(0, "Seed of the synthetic store and the heads.")

    def __post_init__(self) -> None:
        from fcache.train_heads.tasks import task_def

        check_attention(self.attention)
        bench = task_def(self.task).bench
        resolved = {
            "input_size": self.input_size or bench.input_size_of.get(self.model, bench.input_size),
            "batch_size": self.batch_size or bench.batch_of.get(self.model, bench.batch),
            "frames": (self.frames or bench.frames) if bench.frames else 0,
            "head": self.head or bench.frozen_head,
            "finetune_head": self.finetune_head or bench.finetune_head,
            "device": resolve_device(self.device),
        }
        for k, v in resolved.items():
            object.__setattr__(self, k, v)
        positive = {"--iters": self.iters, "--batch-size": self.batch_size, "--input-size": self.input_size}
        positive |= {"--frames": self.frames} if bench.frames else {}
        bad = [f"{k} {v}: must be at least 1" for k, v in positive.items() if v < 1]
        bad += [f"{k} {v}: must be 0 or more" for k, v in {"--num-workers": self.num_workers, "--window": self.window}.items() if v < 0]
        if bad:
            raise InputError("; ".join(bad))
        if self.input_size % 32:
            raise InputError(f"--input-size {self.input_size} is not a multiple of 32 (the backbone's coarsest stride)")

    def head_of(self, setting: str) -> str:
        return self.finetune_head if setting == "finetune" else self.head


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """One row per setting: seconds per iteration, peak memory, trainable parameters, or the error that stopped it."""
    heads = _parse_heads(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="fcache-bench-"))
    try:
        store = _store(cfg, heads, tmp / "bench.zarr")
        settings = ("store",) if cfg.features_only else SETTINGS
        return [_in_own_process(setting, cfg, store) for setting in settings]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parse_heads(cfg: BenchConfig) -> list[Any]:
    """Both head specs, parsed against the task's heads up front: a mistyped head is one line, not three error rows."""
    from fcache.train_heads.tasks import task_def

    tdef = task_def(cfg.task)
    return [tdef.parse(cfg.head), tdef.parse(cfg.finetune_head)]


def _store(cfg: BenchConfig, heads: list[Any], path: Path) -> Path:
    """2 x batch synthetic samples shaped like ``cfg.model``'s levels (those the heads read, where the task says so)."""
    from fcache.apps.bench_stores import synthetic_store
    from fcache.extract.backbones import build_backbone, default_window
    from fcache.train_heads.tasks import task_def

    levels = task_def(cfg.task).bench.levels(heads)
    window = cfg.window or default_window(cfg.model, cfg.task)
    bb = build_backbone(cfg.model, input_size=cfg.input_size, levels=levels, meta=True, window=window)
    return synthetic_store(path, cfg.task, bb.info, samples=2 * cfg.batch_size, shard_size=cfg.batch_size, dtype=cfg.dtype,
                           frames=cfg.frames, seed=cfg.seed)  # fmt: skip


def _in_own_process(setting: str, cfg: BenchConfig, store: Path) -> dict[str, Any]:
    """Measure one setting in a fresh (spawned, non-daemonic: it starts DataLoader workers) process; its row, or an error row."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(results, setting, dataclasses.asdict(cfg), str(store)))
    proc.start()
    while True:
        try:
            row = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                row = {**_row_keys(setting, cfg), "error": f"the measuring process died (exit code {proc.exitcode}; out of memory?)"}
                break
    proc.join()
    return row


def _child(results: Any, setting: str, cfg_dict: dict[str, Any], store: str) -> None:
    cfg = BenchConfig(**cfg_dict)
    try:
        from fcache.apps.bench_measure import measure

        results.put(_row_keys(setting, cfg) | measure(setting, cfg, store))
    except Exception as e:  # noqa: BLE001 - reported as the row's error
        results.put({**_row_keys(setting, cfg), "error": f"{type(e).__name__}: {e}"})


def _row_keys(setting: str, cfg: BenchConfig) -> dict[str, Any]:
    row = {"setting": setting, "task": cfg.task, "model": cfg.model, "input_size": cfg.input_size, "batch": cfg.batch_size}
    return row | ({"frames": cfg.frames} if cfg.frames else {}) | {"head": cfg.head_of(setting)}


def format_rows(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    clip = f" x {first['frames']} frames" if "frames" in first else ""
    w = max(len(r["head"]) for r in rows)
    lines = [f"{first['task']}: {first['model']} @ {first['input_size']}px, batch {first['batch']}{clip}", "",
             f"{'setting':9s} {'head':{w}s} {'s/iter':>8s} {'peak GB':>8s} {'trainable':>14s}"]  # fmt: skip
    store = next((r for r in rows if r["setting"] == "store" and "s_per_iter" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setting']:9s} {r['head']:{w}s} {r['error']}")
            continue
        ratio = f"  ({r['s_per_iter'] / store['s_per_iter']:.2f}x the store's time)" if store and r is not store else ""
        lines.append(
            f"{r['setting']:9s} {r['head']:{w}s} {r['s_per_iter']:8.3f} {r['peak_mem_gb']:8.2f} {r['trainable_params']:14,d}{ratio}"
        )
    return "\n".join(lines)
