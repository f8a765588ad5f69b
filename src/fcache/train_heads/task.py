"""The task contract: what the loop, evaluation and analysis need from a task, and the ``TaskDef`` every task exports.

A task (detection, segmentation, video, classification) is a package with its heads, its targets, its metric and one
``TASK = TaskDef(...)``; ``fcache.train_heads.tasks.TASKS`` lists them. Everything task-specific sits behind
:class:`Task` (an object made from a store and a head spec, or rebuilt from a RUN's record); everything a command
needs to know about a task without making one (its heads, defaults, main metric, which views it evaluates) is in its
:class:`TaskDef`. Adding a task is its package plus one ``TASKS`` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fcache.common.errors import InputError
from fcache.spec import Geometry, LevelSpec
from fcache.train_heads.headspec import HeadDef, HeadSpec, parse_head

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from fcache.store import FeatureStore


@dataclass
class Batch:
    """Collated items: features stacked per level, the rest per sample."""

    index: list[int]
    view: list[int]
    features: dict[str, Tensor]  # level -> (B, C, H, W)
    geometry: list[Geometry]
    targets: list[Any]  # task-specific training targets in view coordinates (empty when evaluating)
    raw: list[dict[str, Any]]  # each item's targets as read: the ground truth for evaluation

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        feats = {k: v.to(device, non_blocking=nb) for k, v in self.features.items()}
        targets = [_to(t, device) for t in self.targets]
        return Batch(self.index, self.view, feats, self.geometry, targets, self.raw)

    def chunks(self, k: int) -> list[Batch]:
        """``k`` consecutive equal micro-batches (gradient accumulation); ``[self]`` for one."""
        if k == 1:
            return [self]
        n = len(self.index)
        assert n % k == 0, "the loader reads k whole micro-batches per iteration"
        cut = [slice(s, s + n // k) for s in range(0, n, n // k)]
        return [
            Batch(
                self.index[s], self.view[s], {lv: x[s] for lv, x in self.features.items()}, self.geometry[s], self.targets[s], self.raw[s]
            )  # fmt: skip
            for s in cut
        ]


def _to(x: Any, device: torch.device) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=device.type == "cuda")
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


class Task(Protocol):
    """One head of one task, fitted to a store: what the loop, evaluation and ``fcache cka`` call."""

    name: str
    head: HeadSpec
    target_names: tuple[str, ...]  # store targets every training item must carry
    eval_target_names: tuple[str, ...]  # store targets evaluation reads (the ground truth of the metric)

    def levels(self, available: Sequence[LevelSpec]) -> tuple[LevelSpec, ...]:
        """The stored levels the head reads; InputError when the head cannot run on ``available``."""
        ...

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module: ...

    def targets(self, item: Mapping[str, Any], geometry: Geometry) -> Any:
        """Training targets of one item in its view's coordinates (runs in DataLoader workers)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]: ...

    def predict(self, model: nn.Module, batch: Batch) -> list[Any]:
        """One prediction per sample, in original-sample coordinates."""
        ...

    def evaluate(self, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any], out: Path | None) -> dict[str, float]:
        """Metrics of ``predictions`` against the ground truth in ``raw``; writes prediction files into ``out``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON that rebuilds this task without the store (``TaskDef.from_description``; written into config.json)."""
        ...


class TaskClass(Protocol):
    """A task's class: makes the task from a store and a head spec, or from a RUN's record of it."""

    @classmethod
    def from_store(cls, store: FeatureStore, head: str) -> Task: ...

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> Task: ...


@dataclass(frozen=True)
class TaskDef:
    """Everything fcache knows about a task without making one: its heads, how it is made and checked, its metric.

    Attributes:
        heads: head name -> :class:`HeadDef` (parameters, builder, training defaults).
        task: the class whose ``from_store(store, head)`` makes the task (checking the store can train it) and whose
            ``from_description(record)`` rebuilds it from a RUN folder (evaluation, analysis).
        check_eval_store: (task, store) -> None; InputError when the store cannot score the task's head.
        main_metric: the metric that ranks runs (``fcache report``, sweeps, best checkpoints).
        higher_is_better: the direction of ``main_metric`` (every task's so far: AP, mIoU, top-1).
        defaults: TrainConfig fields every head of the task trains with unless flags say otherwise.
        eval_views: ``plain``: evaluation reads view 0 of every sample; ``all``: every view at once (test views, clips).
        shown_families: the metric families (``box`` of ``box/AP``) ``fcache report``'s leaderboard shows; () for all.
            Tasks that also score each view alone show their views' mean only.
    """

    name: str
    heads: Mapping[str, HeadDef]
    task: TaskClass
    check_eval_store: Callable[[Any, FeatureStore], None]
    main_metric: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True
    eval_views: str = "plain"
    shown_families: tuple[str, ...] = ()

    def from_store(self, store: FeatureStore, head: str) -> Task:
        return self.task.from_store(store, head)

    def from_description(self, d: Mapping[str, Any]) -> Task:
        return self.task.from_description(d)

    def parse(self, text: str) -> HeadSpec:
        """``NAME[:key=value,...]`` parsed against this task's heads (and the head's own cross-key checks)."""
        spec = parse_head(text, {name: h.params for name, h in self.heads.items()}, task=self.name)
        check = self.heads[spec.name].check
        if check is not None:
            check(spec)
        return spec

    def train_defaults(self, head: str) -> dict[str, Any]:
        """TrainConfig fields ``head`` (spec text) trains with unless flags say otherwise: the task's, then the head's own."""
        family = self.heads.get(head.strip().partition(":")[0])
        return {**self.defaults, **(family.train_defaults if family else {})}


def unknown_task(name: str, known: Sequence[str]) -> InputError:
    return InputError(f"unknown task {name!r}; choose one of: {', '.join(known)}")
