"""What leaves fcache from a label head (classification, video): the views' mean softmax scores and the top classes
(``fcache.load``, ``fcache predict``'s predictions.jsonl), the confusion matrix and per-class top-1 of an evaluation, and
the exported graphs (logits). Nothing is drawn over an input: a label has no place in the image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fcache.spec import Targets
from fcache.store import FeatureStore
from fcache.train_heads.classification.scoring import PREDICTIONS, prediction_records
from fcache.train_heads.pictures import enlarge
from fcache.train_heads.task import ExportDef, NamedInput, OutputOptions, Outputs, PerClass


def top_classes(task: Any, mean: np.ndarray, k: int) -> list[dict[str, Any]]:
    """The ``k`` best classes of the views' mean scores (K,): index, name, score."""
    top = np.argsort(-mean, kind="stable")[:k]
    return [{"class": int(c), "name": task.label_names[int(c)], "score": float(mean[c])} for c in top]


def present(task: Any, prediction: Mapping[str, Any], options: OutputOptions) -> dict[str, Any]:
    """``probs`` (K,): the views' mean softmax scores; ``top``: the ``top_k`` best classes."""
    probs = np.asarray(prediction["probs"]).mean(axis=0)
    return {"probs": torch.from_numpy(probs), "top": top_classes(task, probs, options.top_k)}


class RecordFiles:
    """``predictions.jsonl``: per input, ``fcache eval``'s record and the ``top_k`` classes with names and scores."""

    entries: tuple[str, ...] = (PREDICTIONS,)

    def __init__(self, task: Any, out: Path, options: OutputOptions, view_names: Sequence[str]) -> None:
        self.task, self.path, self.options, self.view_names = task, out / PREDICTIONS, options, list(view_names)
        self.lines: list[dict[str, Any]] = []

    def add(self, item: NamedInput, prediction: Any) -> None:
        """The record of one input; a store's sample carries its label (-1: none)."""
        probs = np.asarray(prediction["probs"])  # (V, K)
        views = self.view_names or [f"view{v}" for v in range(len(probs))]
        label = int(np.asarray(item.targets[Targets.LABEL])) if item.targets and Targets.LABEL in item.targets else -1
        (rec,) = prediction_records([item.key], np.array([label]), probs[None], views[: len(probs)], self.task.label_names)
        top = [c | {"score": round(c["score"], 6)} for c in top_classes(self.task, probs.mean(axis=0), self.options.top_k)]
        self.lines.append(rec | {"file": item.file, "top": top})

    def finish(self) -> dict[str, Any]:
        from fcache.common.files import atomic_file

        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.lines))
        return {"files": [str(self.path)]}


def truth(store: FeatureStore, index: int, raw: Mapping[str, Any]) -> None:
    return None


def draw(task: Any, image: np.ndarray, prediction: Any, truth: Any, options: OutputOptions) -> None:
    return None


def pictures(folder: Path) -> dict[str, np.ndarray]:
    """The confusion matrix of the views' mean (rows: true class, normalised; brighter: more)."""
    path = folder / PREDICTIONS
    if not path.is_file():
        return {}
    pairs = [(r["label"], r["pred"]) for r in map(json.loads, path.read_text().splitlines()) if r.get("label", -1) >= 0]
    if not pairs:
        return {}
    k = max(max(pair) for pair in pairs) + 1
    counts = np.zeros((k, k), np.float64)
    for label, pred in pairs:
        counts[label, pred] += 1
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    grey = (255 * rows).round().astype(np.uint8)
    return {"confusion": enlarge(np.repeat(grey[:, :, None], 3, axis=2))}


def per_class(folder: Path) -> PerClass:
    """Top-1 of the views' mean scores per class (the share of a class's samples predicted as it)."""
    path = folder / PREDICTIONS
    if not path.is_file():
        return {}
    hits: dict[str, list[bool]] = {}
    for line in path.read_text().splitlines():
        p = json.loads(line)
        if p.get("label_name") is not None:
            hits.setdefault(p["label_name"], []).append(p["pred"] == p["label"])
    return {"top-1 per class": {name: sum(h) / len(h) for name, h in hits.items()}}


def probe_logits(head: nn.Module, features: dict[str, Tensor], canvas: int, content: Tensor) -> Tensor:
    (x,) = features.values()
    return head(x, content)


def content_input(batch: int, canvas: int) -> dict[str, Tensor]:
    """``content`` (B, 2): the valid height and width of each image on the canvas (here the whole canvas)."""
    return {"content": torch.full((batch, 2), float(canvas))}


OUTPUTS = Outputs(present, RecordFiles, truth, draw)
EXPORT = ExportDef("logits (B, K)", probe_logits, content_input)
