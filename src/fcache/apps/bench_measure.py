"""One setting of ``fcache bench``, measured inside its own process: a warm-up step, then ``iters`` timed steps.

The head trains as ``fcache train-head`` trains it (same model, optimiser, loader and step); for the ``online`` and
``finetune`` settings the store only gives targets and geometry, and the batch's features come from the store's
backbone (rebuilt from the manifest, random-init) run on random images: frozen in inference mode, or trained with the
head. Video clips run through the backbone frame by frame: (B * T, 3, S, S) images, (B, T, C, H, W) features.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from fcache.apps.bench import BenchConfig
from fcache.common.devices import peak_memory_gb


def measure(setting: str, cfg: BenchConfig, store: str) -> dict[str, Any]:
    """Seconds per iteration (mean and min over the timed ones), peak memory, trainable parameters of ``setting``."""
    row: dict[str, Any] = {}
    try:
        row |= _steps(setting, cfg, store)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory ({str(e).splitlines()[0][:80]})"
    row["peak_mem_gb"] = peak_memory_gb(cfg.device)
    return row


def _steps(setting: str, cfg: BenchConfig, store: str) -> dict[str, Any]:
    from fcache.extract.backbones import parameter_count
    from fcache.extract.rebuild import backbone_of
    from fcache.store.transit import Buffers
    from fcache.train_heads.config import TrainConfig
    from fcache.train_heads.data import train_loader
    from fcache.train_heads.defaults import with_defaults
    from fcache.train_heads.loop import make_optimizer, train_step
    from fcache.train_heads.training import prepare_training, training_data

    device = torch.device(cfg.device)
    workers = cfg.num_workers if setting == "store" else 0
    given = TrainConfig(store=store, out="", task=cfg.task, head=cfg.head_of(setting), iters=10_000, batch_size=cfg.batch_size,
                        device=cfg.device, num_workers=workers, warmup=0, seed=cfg.seed)  # fmt: skip
    tcfg = with_defaults(given)
    p = prepare_training(tcfg)
    model = p.model.to(device).train()
    data = training_data(p, cfg.seed, None if setting == "store" else ())  # online: targets and geometry only
    batches = train_loader(data, p.task, batch_size=cfg.batch_size, seed=cfg.seed, start=0, stop=cfg.iters + 1,
                           num_workers=workers, device=device)  # fmt: skip
    optimizer = make_optimizer(model, tcfg)
    backbone, backbone_params = None, 0
    if setting != "store":
        backbone = backbone_of(p.store.manifest, device=cfg.device, attention=cfg.attention)  # the store's, from its manifest
        if setting == "finetune":
            backbone.model.train().requires_grad_(True)
            backbone_params = parameter_count(backbone.model)
            optimizer.add_param_group({"params": list(backbone.model.parameters()), "weight_decay": tcfg.weight_decay})
    images = _images(cfg).to(device)
    times, buffers = [], Buffers()
    for k, batch in enumerate(batches):
        _sync(device)
        t = time.perf_counter()
        batch = batch.to(device, buffers)  # as train_pass: the stored values decoded on the device
        if backbone is not None:
            batch.features = _backbone_features(backbone, images, setting, device, cfg.frames)
        train_step(model, optimizer, p.task, batch, tcfg, device, k)
        _sync(device)
        times.append(time.perf_counter() - t)
    timed = times[1:]  # the first step warms up
    return {
        "s_per_iter": float(np.mean(timed)),
        "s_per_iter_min": float(np.min(timed)),
        "trainable_params": p.params + backbone_params,
        "head_params": p.params,
        "backbone_params": backbone_params,
    }


def _images(cfg: BenchConfig) -> torch.Tensor:
    """Random inputs of one batch: (B, 3, S, S), or (B * T, 3, S, S) frames of B clips."""
    n = cfg.batch_size * (cfg.frames or 1)
    return torch.randn(n, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))


def _backbone_features(backbone: Any, images: torch.Tensor, setting: str, device: torch.device, frames: int) -> dict[str, torch.Tensor]:
    if setting == "online":  # inference mode, bf16 autocast on CUDA; clone: a normal tensor the head may save for backward
        feats = {k: v.clone() for k, v in backbone.forward(images).items()}
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = backbone.features(images)
    if frames:
        feats = {k: v.unflatten(0, (-1, frames)) for k, v in feats.items()}  # (B, T, C, H, W)
    return feats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
