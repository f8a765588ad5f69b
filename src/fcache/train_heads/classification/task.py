"""The classification task (a linear probe on pooled p5) and what every label task shares with it (video too).

Head spec: ``linear[:level=p5,dropout=0.0]``. Shared by :class:`LabelTask`: one class label per sample
(``targets/label``), cross-entropy, evaluation over every view of a sample (the plain view and the store's test views;
for video every clip x crop) with top-1 / top-5 per view and of the views' mean softmax scores, and the per-sample
predictions in RUN/predictions.jsonl. Training defaults (the paper gives none for a linear probe; MAE's probe has no
weight decay and a cosine schedule): batch 64, AdamW lr 1e-3, weight decay 0, cosine decay, 1 warm-up epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import LEVEL_NAMES, Geometry, LevelSpec, Targets
from fcache.store import FeatureStore
from fcache.train_heads.classification.model import LinearProbe
from fcache.train_heads.classification.outputs import EXPORT, OUTPUTS, per_class, pictures
from fcache.train_heads.classification.scoring import (
    AVERAGED,
    PREDICTIONS,
    TOPK_NAMES,
    prediction_records,
    score_views,
    write_predictions,
)
from fcache.train_heads.classification.synthetic import BENCH
from fcache.train_heads.data import KEY, VIEW_GEOMETRY, VIEW_NAMES
from fcache.train_heads.headspec import HeadDef, HeadSpec, Param
from fcache.train_heads.task import Batch, TaskDef

LEVEL = Param("p5", kind="choice", choices=tuple(LEVEL_NAMES.values()), help="the stored level the head reads")


def _linear(task: ClassificationTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    (level,) = levels
    return LinearProbe(level.channels, task.num_classes, level.stride, task.head["dropout"])


HEADS: dict[str, HeadDef] = {
    "linear": HeadDef({"level": LEVEL, "dropout": Param(0.0, kind="prob", help="dropout before the classifier")}, _linear),
}


def parse_classification_head(text: str) -> HeadSpec:
    return TASK.parse(text)


def find_level(head: HeadSpec, available: Sequence[LevelSpec]) -> LevelSpec:
    """The stored level named by the head's ``level`` key; ValueError naming the levels there are."""
    have = {lv.name: lv for lv in available}
    if head["level"] not in have:
        raise InputError(
            f"head {head.name} reads level {head['level']} but the store holds only {', '.join(have)}; "
            "pick level=... among those, or extract that level"
        )
    return have[head["level"]]


class LabelTask:
    """One class label per sample: levels, targets, loss, multi-view prediction and scoring. Subclasses give the model."""

    name: str = ""
    target_names: tuple[str, ...] = (Targets.LABEL,)
    eval_target_names: tuple[str, ...] = target_names
    view_ndim: int = 3  # dimensions of one view of the level: (C, H, W); video: (T, C, H, W)

    def __init__(self, head: HeadSpec, label_names: Sequence[str]) -> None:
        if not label_names:
            raise InputError(f"a {self.name} task needs the class names (dataset.label_names of the store)")
        self.head = head
        self.label_names = tuple(label_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def level(self) -> str:
        return str(self.head["level"])

    def describe(self) -> dict[str, Any]:
        return {"head": str(self.head), "label_names": list(self.label_names)}

    def levels(self, available: Sequence[LevelSpec]) -> tuple[LevelSpec, ...]:
        return (find_level(self.head, available),)

    def logits(self, model: nn.Module, x: Tensor, geometry: Sequence[Geometry]) -> Tensor:
        """(n, K) logits of n views ``x`` (n, *view shape) with their geometry."""
        raise NotImplementedError

    def targets(self, item: Mapping[str, Any], geometry: Geometry) -> Tensor:
        return torch.tensor(int(item["targets"][Targets.LABEL]), dtype=torch.long)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Cross-entropy over the labelled samples of the batch (label -1 counts for nothing)."""
        logits = self.logits(model, batch.features[self.level], batch.geometry).float()  # (B, K)
        labels = torch.stack(batch.targets)  # (B,)
        labelled = labels >= 0
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return {"loss_cls": (ce * labelled).sum() / labelled.sum().clamp(min=1)}

    def predict(self, model: nn.Module, batch: Batch) -> list[dict[str, Any]]:
        """Per sample: its index and the softmax scores (V, K) of each of its views."""
        x = batch.features[self.level]
        if x.ndim == self.view_ndim + 1:  # one view per sample (a FeatureDataset): V = 1
            x = x[:, None]
            geometry = [[g] for g in batch.geometry]
        else:  # (B, V, ...) from AllViews
            geometry = [[Geometry.from_array(a) for a in raw[VIEW_GEOMETRY]] for raw in batch.raw]
        b, v = x.shape[:2]
        logits = self.logits(model, x.flatten(0, 1), [g for per_sample in geometry for g in per_sample])  # (B * V, K)
        probs = logits.float().softmax(-1).reshape(b, v, -1).cpu().numpy()
        return [{"index": i, "probs": p} for i, p in zip(batch.index, probs, strict=True)]

    def evaluate(self, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any], out: Path | None) -> dict[str, float]:
        """Top-1 / top-5 per view and of the views' mean scores; writes RUN/predictions.jsonl."""
        if not predictions:
            raise InputError("no sample to evaluate")
        names = tuple(raw[0].get(VIEW_NAMES, ("plain",)))
        probs = np.stack([p["probs"] for p in predictions])  # (N, V, K)
        labels = np.array([int(r[Targets.LABEL]) for r in raw], dtype=np.int64)
        metrics = score_views(probs, labels, names)
        if out is not None:
            keys = [str(r.get(KEY, p["index"])) for r, p in zip(raw, predictions, strict=True)]
            write_predictions(Path(out) / PREDICTIONS, prediction_records(keys, labels, probs, names, self.label_names))
        return metrics


class ClassificationTask(LabelTask):
    """A linear probe on one globally pooled level of an image store with class labels."""

    name = "classification"

    @classmethod
    def from_store(cls, store: FeatureStore, head: str) -> ClassificationTask:
        check_store(store)
        return cls(parse_classification_head(head), store.manifest.dataset.label_names)

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> ClassificationTask:
        return cls(parse_classification_head(d["head"]), d["label_names"])

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module:
        return HEADS[self.head.name].build(self, levels)

    def logits(self, model: nn.Module, x: Tensor, geometry: Sequence[Geometry]) -> Tensor:
        content = torch.tensor([[g.valid_h, g.valid_w] for g in geometry], dtype=torch.float32)  # (n, 2)
        return model(x, content)


def check_labels(store: FeatureStore, task: str, hint: str) -> None:
    """``store`` has class labels and names, and some usable sample is labelled."""
    dataset = store.manifest.dataset
    if Targets.LABEL not in store.target_names or not dataset.label_names:
        have = ", ".join(store.target_names) or "none"
        raise InputError(f"{store.root} has no class labels (a {dataset.kind} store with targets: {have}); --task {task} needs {hint}")
    ok = store.ok_indices
    if len(ok) and not (np.asarray(store.target(Targets.LABEL))[ok] >= 0).any():
        raise InputError(f"no usable sample of {store.root} has a label (all are -1); --task {task} needs {hint}")


def check_store(store: FeatureStore) -> None:
    """The store can train or evaluate a linear probe: image features with class labels."""
    if store.video:
        raise InputError(f"{store.root} is a video store; train its clips with --task video")
    check_labels(store, "classification", "an ImageFolder layout (--dataset folder with a sub-folder per class) or labelled wds shards")


def check_same_classes(task: LabelTask, store: FeatureStore) -> None:
    have = tuple(store.manifest.dataset.label_names)
    if have != task.label_names:
        show = lambda names: ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")  # noqa: E731
        raise InputError(
            f"{store.root} has classes ({len(have)}: {show(have)}) but the head was trained on ({task.num_classes}: "
            f"{show(task.label_names)}); evaluate on a store of the same dataset"
        )


def check_eval_store(task: ClassificationTask, store: FeatureStore) -> None:
    """``store`` can score ``task``'s head: labelled image features of the same classes."""
    check_store(store)
    check_same_classes(task, store)


TASK = TaskDef(
    "classification",
    HEADS,
    ClassificationTask,
    check_eval_store,
    "avg/top1",
    defaults={"batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 1.0},
    eval_views="all",  # the plain view and the test views, each and averaged
    shown_families=(AVERAGED,),
    metric_names=TOPK_NAMES,
    outputs=OUTPUTS,
    pictures=pictures,
    per_class=per_class,
    export=EXPORT,
    bench=BENCH,
)
