"""The task contract: what the loop, evaluation, analysis and the apps need from a task, and the ``TaskDef`` every task
exports.

A task (detection, segmentation, depth, video, classification) is a package with its heads, its targets, its metric and
one ``TASK = TaskDef(...)``; ``fcache.train_heads.tasks.TASKS`` lists them. Everything task-specific sits behind
:class:`Task` (an object made from a store and a head spec, or rebuilt from a RUN's record) and the hooks of its
:class:`TaskDef`: its heads, defaults, main metric, which views it evaluates, how its predictions leave fcache
(:class:`Outputs`: ``fcache.load``, ``fcache predict``, drawings), what evaluation files show (pictures, per-class
tables), what ``fcache export``'s graph computes (:class:`ExportDef`) and how ``fcache bench`` measures it
(:class:`BenchDef`). Adding a task is its package plus one ``TASKS`` entry; no code outside the package asks which task
it is.
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
    import numpy as np
    import torch
    from torch import Tensor, nn

    from fcache.store import FeatureStore
    from fcache.store.transit import Buffers, Stored


@dataclass
class Batch:
    """Collated items: features stacked per level, the rest per sample. Features read from a store travel as their stored
    values (``stored``) and become float32 ``features`` on the device the batch is moved to (``to``)."""

    index: list[int]
    view: list[int]
    features: dict[str, Tensor]  # level -> (B, C, H, W) float32
    geometry: list[Geometry]
    targets: list[Any]  # task-specific training targets in view coordinates (empty when evaluating)
    raw: list[dict[str, Any]]  # each item's targets as read: the ground truth for evaluation
    stored: dict[str, Stored] = field(default_factory=dict)  # level -> stored values, decoded by ``to``

    def to(self, device: torch.device, buffers: Buffers | None = None) -> Batch:
        """The batch on ``device``, every level float32 there: stored values are copied (from pinned memory, without
        blocking, on a GPU) and decoded as the first operations on the device, into ``buffers`` (reused from batch to batch
        on a CPU) when given."""
        from fcache.store.transit import decode

        nb = device.type == "cuda"
        feats = {k: v.to(device, non_blocking=nb) for k, v in self.features.items()}
        feats |= {k: decode(s.to(device, non_blocking=nb), k, buffers) for k, s in self.stored.items()}
        targets = [_to(t, device) for t in self.targets]
        return Batch(self.index, self.view, feats, self.geometry, targets, self.raw)

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (the DataLoader's ``pin_memory`` calls it), for asynchronous copies to a GPU."""
        feats = {k: v.pin_memory() for k, v in self.features.items()}
        stored = {k: s.pin_memory() for k, s in self.stored.items()}
        return Batch(self.index, self.view, feats, self.geometry, [_pin(t) for t in self.targets], self.raw, stored)

    def chunks(self, k: int) -> list[Batch]:
        """``k`` consecutive equal micro-batches (gradient accumulation); ``[self]`` for one."""
        assert not self.stored, "a batch is cut after Batch.to has decoded its stored values"
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


def _pin(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, Mapping):
        return {k: _pin(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_pin(v) for v in x)
    return x


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
class OutputOptions:
    """What ``fcache predict`` and ``fcache.load`` let a user choose about a task's predictions."""

    score_thr: float = 0.0  # detection: keep detections scoring at least this
    top_k: int = 5  # label tasks: classes listed per input


@dataclass(frozen=True)
class NamedInput:
    """One input of ``fcache predict`` as its files name it."""

    key: str  # its name: the path relative to the folder it was found in, its file name, or a store's sample key
    file: str  # its path; a store's sample: its key
    stem: str  # what its output files are called (``common.outputs.output_names``): ``labels/<stem>.png``
    targets: Mapping[str, Any] | None = None  # a store's sample: its targets as evaluation reads them; None for a file


class PredictionFiles(Protocol):
    """The files one ``fcache predict`` writes for a task, filled as samples arrive."""

    entries: tuple[str, ...]  # the names it may write into the output folder (files or folders), made when first written

    def add(self, item: NamedInput, prediction: Any) -> None:
        """One input's prediction."""
        ...

    def finish(self) -> dict[str, Any]:
        """Writes what is left; the summary: ``files`` (what was written) and the task's counts."""
        ...


@dataclass(frozen=True)
class Outputs:
    """How a task's predictions (``Task.predict``'s) leave fcache.

    Attributes:
        present: (task, prediction, options) -> what ``fcache.load(RUN)(inputs)`` returns for one input.
        files: (task, out folder, options, view names) -> the :class:`PredictionFiles` of ``fcache predict``.
        truth: (store, sample index, the item's raw targets) -> the ground truth drawn beside a prediction, or None.
        draw: (task, image (H, W, 3) uint8, prediction, truth or None, options) -> the overlay ``--draw`` saves, or None.
    """

    present: Callable[[Any, Any, OutputOptions], Any]
    files: Callable[[Any, Path, OutputOptions, Sequence[str]], PredictionFiles]
    truth: Callable[[FeatureStore, int, Mapping[str, Any]], Any]
    draw: Callable[[Any, np.ndarray, Any, Any, OutputOptions], np.ndarray | None]


def no_inputs(batch: int, canvas: int) -> dict[str, Tensor]:
    return {}


@dataclass(frozen=True)
class ExportDef:
    """What ``fcache export``'s graph computes after the features.

    Attributes:
        outputs: what the graph returns, in words (``FILE.json``'s ``outputs``).
        forward: (head, features level -> (B, C, H, W) in the head's level order, canvas side, *extra inputs) -> outputs.
        inputs: (batch, canvas) -> the graph's inputs beside the images (or features): name -> an example tensor.
    """

    outputs: str
    forward: Callable[..., Any]
    inputs: Callable[[int, int], dict[str, Tensor]] = no_inputs


def no_targets(n: int, canvas: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {}


@dataclass(frozen=True)
class Synthetic:
    """A task's synthetic targets for ``fcache bench``'s stores.

    Attributes:
        specs: canvas -> ``fstore.create``'s keyword arguments (``targets``, ``target_attrs``).
        driver: (n, canvas, rng) -> targets of all samples, written at store creation.
        per_sample: (n, canvas, rng) -> targets of one unit's n samples, written with its features (or None).
        classes: class names the store records (``class0``, ``class1``, ...).
    """

    specs: Callable[[int], dict[str, Any]]
    driver: Callable[[int, int, np.random.Generator], dict[str, np.ndarray]] = no_targets
    per_sample: Callable[[int, int, np.random.Generator], dict[str, np.ndarray]] | None = None
    classes: int = 0


def all_levels(heads: Sequence[HeadSpec]) -> tuple[str, ...] | None:
    return None


@dataclass(frozen=True)
class BenchDef:
    """How ``fcache bench`` measures a task: the heads, batch and input it takes by default, and its synthetic store.

    Attributes:
        frozen_head, finetune_head: the heads of the frozen rows (store, online) and of the finetune row.
        batch, input_size: samples per iteration and canvas side; ``batch_of`` / ``input_size_of``: per backbone alias.
        targets: the synthetic targets.
        frames: frames per clip (a task of clips); 0: images.
        paper: the defaults are the paper's Tables 7/8 columns (``apps.bench.PAPER``).
        levels: (the parsed heads) -> the levels the store holds; None: every level of the backbone.
    """

    frozen_head: str
    finetune_head: str
    batch: int
    input_size: int
    targets: Synthetic
    frames: int = 0
    paper: bool = False
    batch_of: Mapping[str, int] = field(default_factory=dict)
    input_size_of: Mapping[str, int] = field(default_factory=dict)
    levels: Callable[[Sequence[HeadSpec]], tuple[str, ...] | None] = all_levels


PerClass = dict[str, dict[str, "float | None"]]  # a table's title (``box AP per class``) -> row (a class) -> value


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
        metric_names: the metrics of a family in the order tables show them (``AP``, ``AP50``, ...).
        percent: the metrics are fractions shown in percent; False: shown as they are (metres, ratios).
        outputs: how predictions are presented, written and drawn (:class:`Outputs`).
        pictures: RUN/eval/<store> folder -> name -> (H, W, 3) uint8 pictures of its predictions (TensorBoard, W&B).
        per_class: RUN/eval/<store> folder -> ``fcache report --per-class``'s tables: title -> row -> value.
        export: what ``fcache export``'s graph computes (:class:`ExportDef`).
        bench: how ``fcache bench`` measures the task (:class:`BenchDef`).
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
    metric_names: tuple[str, ...] = field(kw_only=True)
    percent: bool = field(default=True, kw_only=True)
    outputs: Outputs = field(kw_only=True)
    pictures: Callable[[Path], dict[str, np.ndarray]] = field(kw_only=True)
    per_class: Callable[[Path], PerClass] = field(kw_only=True)
    export: ExportDef = field(kw_only=True)
    bench: BenchDef = field(kw_only=True)

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

    @property
    def number_format(self) -> tuple[float, int]:
        """(factor, decimals) tables show the metrics with: percent with one decimal, or as they are with three."""
        return (100.0, 1) if self.percent else (1.0, 3)

    def train_defaults(self, head: str) -> dict[str, Any]:
        """TrainConfig fields ``head`` (spec text) trains with unless flags say otherwise: the task's, then the head's own."""
        family = self.heads.get(head.strip().partition(":")[0])
        return {**self.defaults, **(family.train_defaults if family else {})}


def unknown_task(name: str, known: Sequence[str]) -> InputError:
    return InputError(f"unknown task {name!r}; choose one of: {', '.join(known)}")
