"""Heads trained from a feature store (the paper's H(.) on a frozen B(.)): necks, detection, segmentation, video,
classification, the shared loop, evaluation."""

from __future__ import annotations

from fcache.train_heads.config import EvalConfig, TrainConfig
from fcache.train_heads.headspec import HeadSpec, Param, parse_head
from fcache.train_heads.loop import Batch, Task, TrainResult, build_model, evaluate, train
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.schedule import get_lr
from fcache.train_heads.training import TASKS, prepare_training, run_eval, run_train, task_defaults, training_data

__all__ = [
    "TASKS",
    "Batch",
    "EvalConfig",
    "HeadSpec",
    "Param",
    "RunDir",
    "Task",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "get_lr",
    "parse_head",
    "prepare_training",
    "run_eval",
    "run_train",
    "task_defaults",
    "train",
    "training_data",
]
