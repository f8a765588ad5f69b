"""The TASKS table: every task fcache trains heads for (adding one = its package + one entry here).

The ``fcache`` command's ``--task`` choices, the per-task training defaults, the metric that ranks runs and the views
evaluation reads all come from these entries (see ``fcache.train_heads.task.TaskDef``).
"""

from __future__ import annotations

from typing import Any

from fcache.train_heads.classification.task import TASK as CLASSIFICATION
from fcache.train_heads.depth.task import TASK as DEPTH
from fcache.train_heads.detection.task import TASK as DETECTION
from fcache.train_heads.segmentation.task import TASK as SEGMENTATION
from fcache.train_heads.task import TaskDef, unknown_task
from fcache.train_heads.video.task import TASK as VIDEO

TASKS: dict[str, TaskDef] = {t.name: t for t in (DETECTION, SEGMENTATION, VIDEO, CLASSIFICATION, DEPTH)}


def task_def(name: str) -> TaskDef:
    """The entry of task ``name``; InputError naming the tasks there are."""
    if name not in TASKS:
        raise unknown_task(name, list(TASKS))
    return TASKS[name]


def task_defaults(task: str, head: str) -> dict[str, Any]:
    """Training hyper-parameters of ``task``'s ``head`` where no flag sets them (paper Tables 11-13)."""
    return task_def(task).train_defaults(head)
