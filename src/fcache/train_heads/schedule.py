"""Learning-rate schedules of the paper's Tables 11-13: linear warm-up, then multi-step, cosine or linear decay.

A pure function of the iteration (nanoGPT's ``get_lr``), so resuming needs no scheduler object.
"""

from __future__ import annotations

import math

from fcache.train_heads.config import TrainConfig


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Learning rate of iteration ``it`` (0-based): decay factor x warm-up factor x ``cfg.lr``.

    Warm-up rises linearly from ``warmup_factor`` to 1 over ``warmup`` iterations (mmdetection's linear warm-up).
    ``step`` multiplies by ``gamma`` at each milestone ``round(s * iters)``; ``cosine`` and ``linear`` decay to 0 at ``iters``.
    """
    if cfg.schedule == "step":
        decay = cfg.gamma ** sum(it >= round(s * cfg.iters) for s in cfg.lr_steps)
    elif cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * min(it, cfg.iters) / cfg.iters))
    elif cfg.schedule == "linear":
        decay = 1.0 - min(it, cfg.iters) / cfg.iters
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    warm = 1.0 if it >= cfg.warmup else cfg.warmup_factor + (1.0 - cfg.warmup_factor) * it / cfg.warmup
    return cfg.lr * decay * warm
