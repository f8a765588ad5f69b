"""``fcache bench``: what the frozen setting and the cache save, per iteration (the paper's Tables 7 and 8).

For one backbone, input size, batch and detection head, three settings, each in its own process so
its peak memory is its own (CUDA: max allocated; CPU: peak RSS of the training process):
  (a) store    - the head trained from a feature store (DataLoader over the store, as train-head does);
  (b) online   - the frozen backbone run on the batch's images (inference mode), then the same head step;
  (c) finetune - the backbone unfrozen: its forward and backward are part of the step, AdamW updates it too.
The store is synthetic (random features of the backbone's exact level shapes, a few boxes per image),
written to a temporary folder; with ``--features-only`` only (a) runs, so a SwinV2-G-shaped head is
measured without the giant's weights (the backbone is built on the meta device for its shapes).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import queue
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcache.common.devices import resolve_device
from fcache.common.errors import InputError

if TYPE_CHECKING:
    import torch

SETTINGS = ("store", "online", "finetune")


@dataclass(frozen=True)
class BenchConfig:
    """``fcache bench`` flags."""

    model: str = "swinv2-t"
    input_size: int = 256
    batch_size: int = 4
    head: str = "fpn"
    steps: int = 3
    device: str = "auto"
    features_only: bool = False
    dtype: str = "fp16"
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("--steps and --batch-size must be at least 1")
        object.__setattr__(self, "device", resolve_device(self.device))


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """One row per setting: seconds per iteration, peak memory (or the error that stopped it, e.g. out of memory)."""
    tmp = Path(tempfile.mkdtemp(prefix="fcache-bench-"))
    try:
        store = synthetic_store(cfg, tmp / "bench.zarr")
        settings = ("store",) if cfg.features_only else SETTINGS
        return [_in_own_process(setting, cfg, store) for setting in settings]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def synthetic_store(cfg: BenchConfig, path: Path) -> Path:
    """2 x batch samples of random features shaped like ``cfg.model``'s levels at ``cfg.input_size``, 3 boxes each."""
    from fcache import store as fstore
    from fcache.extract.backbones import build_backbone
    from fcache.spec import GEOMETRY_FIELDS, DatasetInfo, Geometry, Manifest, Preprocessing, SourceConfig, StorageSpec, keys_digest
    from fcache.store import TargetSpec

    bb = build_backbone(cfg.model, input_size=cfg.input_size, meta=True)
    n, s = 2 * cfg.batch_size, cfg.input_size
    keys = [f"bench{i}" for i in range(n)]
    dataset = DatasetInfo(SourceConfig("synthetic", ""), n, keys_digest(keys), task="detection")
    m = Manifest(bb.info, Preprocessing(seed=cfg.seed), StorageSpec(dtype=cfg.dtype, shard_size=cfg.batch_size), dataset)
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]
    w = fstore.create(
        path, m, keys, targets={"image": TargetSpec("str"), "annotations": TargetSpec("str")}, target_attrs={"categories": categories}
    )
    rng = np.random.default_rng(cfg.seed)
    w.write_targets("image", np.array([json.dumps({"id": i + 1, "width": s, "height": s}) for i in range(n)], dtype=object))
    w.write_targets("annotations", np.array([json.dumps(_boxes(i + 1, s, rng)) for i in range(n)], dtype=object))
    geometry = Geometry(orig_h=s, orig_w=s, scale=1.0, valid_w=s, valid_h=s, canvas=s).to_array()
    for unit in w.pending():
        feats = {lv.name: rng.standard_normal((len(unit), 1, *m.level_shape(lv.name)), dtype=np.float32) for lv in m.levels}
        geo = np.broadcast_to(geometry, (len(unit), 1, len(GEOMETRY_FIELDS))).copy()
        w.write_unit(unit, feats, np.ones(len(unit), np.uint8), geo)
    w.finalize()
    return path


def _boxes(image_id: int, s: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    out = []
    for k in range(3):
        bw, bh = (float(v) for v in rng.uniform(0.1, 0.4, 2) * s)
        x, y = float(rng.uniform(0, s - bw)), float(rng.uniform(0, s - bh))
        poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
        out.append({"id": image_id * 10 + k, "image_id": image_id, "category_id": 1 + k % 2, "bbox": [x, y, bw, bh],
                    "area": bw * bh, "iscrowd": 0, "segmentation": [poly]})  # fmt: skip
    return out


def _in_own_process(setting: str, cfg: BenchConfig, store: Path) -> dict[str, Any]:
    """Run ``_measure`` in a fresh (spawned, non-daemonic: it starts DataLoader workers) process."""
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
                row = {"setting": setting, "error": f"the measuring process died (exit code {proc.exitcode}; out of memory?)"}
                break
    proc.join()
    return row


def _child(results: Any, setting: str, cfg_dict: dict[str, Any], store: str) -> None:
    try:
        results.put(_measure(setting, cfg_dict, store))
    except Exception as e:  # noqa: BLE001 - reported as the row's error
        results.put({"setting": setting, "error": f"{type(e).__name__}: {e}"})


def _measure(setting: str, cfg_dict: dict[str, Any], store: str) -> dict[str, Any]:
    """Runs in a fresh process: warm-up step, then ``steps`` timed steps of one setting."""
    import torch

    cfg = BenchConfig(**cfg_dict)
    row: dict[str, Any] = {"setting": setting, "model": cfg.model, "input_size": cfg.input_size, "batch": cfg.batch_size, "head": cfg.head}
    try:
        row |= _steps(setting, cfg, store)
    except torch.cuda.OutOfMemoryError as e:
        row |= {"error": f"out of memory ({str(e).splitlines()[0][:80]})"}
    if cfg.device.startswith("cuda"):
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        row["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return row


def _steps(setting: str, cfg: BenchConfig, store: str) -> dict[str, Any]:
    import torch

    from fcache.train_heads.config import TrainConfig
    from fcache.train_heads.data import train_loader
    from fcache.train_heads.loop import make_optimizer, train_step
    from fcache.train_heads.training import prepare_training, training_data

    device = torch.device(cfg.device)
    tcfg = TrainConfig(store=store, out="", head=cfg.head, iters=10_000, batch_size=cfg.batch_size, device=cfg.device,
                       num_workers=cfg.num_workers if setting == "store" else 0, warmup=0)  # fmt: skip
    p = prepare_training(tcfg)
    model = p.model.to(device).train()
    data = training_data(p, cfg.seed)
    batches = train_loader(data, p.task, batch_size=cfg.batch_size, seed=cfg.seed, start=0, stop=cfg.steps + 1,
                           num_workers=tcfg.num_workers, device=device)  # fmt: skip
    optimizer = make_optimizer(model, tcfg)
    backbone = None
    if setting != "store":
        from fcache.extract.rebuild import backbone_of

        backbone = backbone_of(p.store.manifest, device=cfg.device)  # the store's backbone, rebuilt from its manifest
        if setting == "finetune":
            backbone.model.train().requires_grad_(True)
            optimizer.add_param_group({"params": list(backbone.model.parameters()), "weight_decay": tcfg.weight_decay})
    params = sum(q.numel() for g in optimizer.param_groups for q in g["params"])
    images = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for k, batch in enumerate(batches):
        _sync(device)
        t = time.perf_counter()
        batch = batch.to(device)
        if backbone is not None:
            batch.features = _backbone_features(backbone, images, setting, device)
        train_step(model, optimizer, p.task, batch, tcfg, device, k)
        _sync(device)
        times.append(time.perf_counter() - t)
    timed = times[1:]  # the first step warms up
    return {"s_per_iter": float(np.mean(timed)), "s_per_iter_min": float(np.min(timed)), "trainable_params": params}


def _backbone_features(backbone: Any, images: torch.Tensor, setting: str, device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    if setting == "online":
        return {k: v.clone() for k, v in backbone.forward(images).items()}  # inference mode, bf16 autocast on CUDA; clone: a normal tensor
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return backbone.features(images)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = rows[0]
    lines = [f"{head['model']} @ {head['input_size']}px, batch {head['batch']}, head {head['head']}", "",
             f"{'setting':10s} {'s/iter':>8s} {'peak GB':>8s} {'trainable':>12s}"]  # fmt: skip
    store = next((r for r in rows if r["setting"] == "store" and "s_per_iter" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['setting']:10s} {r['error']}")
            continue
        ratio = f"  ({r['s_per_iter'] / store['s_per_iter']:.2f}x the store's time)" if store and r is not store else ""
        lines.append(f"{r['setting']:10s} {r['s_per_iter']:8.3f} {r['peak_mem_gb']:8.2f} {r['trainable_params']:12,d}{ratio}")
    return "\n".join(lines)
