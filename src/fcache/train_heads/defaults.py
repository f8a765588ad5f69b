"""The hyper-parameters a :class:`TrainConfig` leaves unset (None), filled from its task's and head's defaults.

``fcache train-head``, ``fcache sweep`` and :func:`fcache.train_heads.training.run_train` call :func:`with_defaults`
on every config they are given, so a config built in Python trains as the command would. A setting neither a flag
nor the task sets takes the detection recipe of the paper's Table 11 (:data:`GENERIC_DEFAULTS`). Kept apart from
``config.py``: a config is plain settings, and the tasks it would need to import import the RUN folder, which holds
configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fcache.train_heads.config import WARMUP_FIELDS, TrainConfig
from fcache.train_heads.tasks import task_defaults

# Table 11 (detection, frozen): what a hyper-parameter is when neither a flag nor the task's defaults set it
GENERIC_DEFAULTS: dict[str, Any] = {
    "batch_size": 16,
    "lr": 3e-4,
    "weight_decay": 0.05,
    "warmup": 500,
    "warmup_epochs": None,
    "warmup_factor": 1e-3,
    "schedule": "step",
    "lr_steps": (8 / 12, 11 / 12),
}


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every unset hyper-parameter taken from the task's and head's defaults, else :data:`GENERIC_DEFAULTS`.

    A warm-up given in either unit (``warmup`` or ``warmup_epochs``) replaces the default in both. Idempotent.
    """
    unset = [k for k in GENERIC_DEFAULTS if getattr(cfg, k) is None]
    if not unset:
        return cfg
    defaults = {**GENERIC_DEFAULTS, **task_defaults(cfg.task, cfg.head)}
    if any(k not in unset for k in WARMUP_FIELDS):
        defaults |= {"warmup": 0, "warmup_epochs": None}
    return dataclasses.replace(cfg, **{k: defaults[k] for k in unset})
