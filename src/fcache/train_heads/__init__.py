"""Heads trained from a feature store (the paper's H(.) on a frozen B(.)): necks, detection, segmentation, depth, video,
classification, the shared loop, evaluation, and the analysis of many runs (``analysis/``).

Where to look: ``tasks.py`` (the TASKS table), ``task.py`` (what a task provides), ``config.py`` (the settings of a
run), ``training.py`` (``fcache train-head``), ``loop.py`` (one read pass, any number of heads), ``data.py`` (what
the loop reads), ``evaluation.py`` (``fcache eval``), ``runfolder.py`` (RUN folders). The names below are imported
when first used, so the light modules (``config.py``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcache.train_heads.config import EvalConfig, TrainConfig
    from fcache.train_heads.evaluation import run_eval
    from fcache.train_heads.loop import train
    from fcache.train_heads.runfolder import RunDir
    from fcache.train_heads.training import prepare_training, run_train, run_train_heads

_EXPORTS = {
    "EvalConfig": "fcache.train_heads.config",
    "TrainConfig": "fcache.train_heads.config",
    "run_eval": "fcache.train_heads.evaluation",
    "train": "fcache.train_heads.loop",
    "RunDir": "fcache.train_heads.runfolder",
    "prepare_training": "fcache.train_heads.training",
    "run_train": "fcache.train_heads.training",
    "run_train_heads": "fcache.train_heads.training",
}

__all__ = ["EvalConfig", "RunDir", "TrainConfig", "prepare_training", "run_eval", "run_train", "run_train_heads", "train"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fcache.train_heads' has no attribute {name!r}")
