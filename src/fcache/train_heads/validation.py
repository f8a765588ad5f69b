"""Evaluation during training: when a head is evaluated, the best main metric so far, and patience.

A head with a validation store is evaluated every ``--eval-every`` iterations and when its training completes. Each
evaluation is compared with the best so far in the task's main metric (``TaskDef.main_metric``, in its direction):
an improvement resets the patience count and, with ``--keep-best``, writes ``best.safetensors``; ``--patience P``
evaluations in a row without one stop the head early. The state (best, its iteration, the count) is checkpointed, so
a resumed run goes on exactly as one that was never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from fcache.train_heads.loggers import RunLog

Evaluate = Callable[["nn.Module", int, "RunLog"], dict[str, float]]  # (weights, iteration, where to log) -> metrics


def improves(value: float | None, best: float | None, higher: bool) -> bool:
    """Whether ``value`` beats ``best`` (None: no evaluation yet) in the metric's direction; an undefined value never does."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if higher else value < best)


@dataclass
class Validation:
    """One head's evaluations during training: the cadence, the metric that ranks them, and the state kept so far."""

    evaluate: Evaluate
    every: int | None  # iterations between evaluations; None: only when training completes
    metric: str
    higher: bool = True
    patience: int | None = None
    keep_best: bool = True
    best: float | None = None
    best_iter: int = 0
    bad: int = 0  # evaluations since the best one
    last_iter: int = 0  # iteration of the last evaluation (0: none)
    last: dict[str, float] = field(default_factory=dict)

    def due(self, done: int, total: int) -> bool:
        """Whether the head is evaluated after ``done`` of ``total`` iterations."""
        return done == total or (self.every is not None and done % self.every == 0)

    def record(self, metrics: Mapping[str, float], iteration: int) -> bool:
        """Take the metrics of the evaluation at ``iteration``; True when they improve the best."""
        self.last, self.last_iter = dict(metrics), iteration
        value = metrics.get(self.metric)
        if improves(value, self.best, self.higher):
            self.best, self.best_iter, self.bad = value, iteration, 0
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        """``patience`` evaluations in a row did not improve the best."""
        return self.patience is not None and self.bad >= self.patience

    def stop_reason(self) -> str:
        shown = "none" if self.best is None else f"{self.best:.4f} at iteration {self.best_iter}"
        return f"{self.metric} did not improve in {self.bad} evaluations (best {shown}; --patience {self.patience})"

    def summary(self) -> dict[str, Any] | None:
        """The best evaluation (metric, value, iteration); None before any evaluation."""
        if not self.last_iter:
            return None
        return {"metric": self.metric, "value": self.best, "iter": self.best_iter if self.best is not None else None}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain numbers: loads with ``weights_only``)."""
        return {"best": self.best, "best_iter": self.best_iter, "bad": self.bad, "last_iter": self.last_iter, "last": dict(self.last)}

    def load(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_iter, self.bad = state["best"], int(state["best_iter"]), int(state["bad"])
        self.last_iter, self.last = int(state["last_iter"]), dict(state["last"])
