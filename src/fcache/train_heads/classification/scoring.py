"""Top-1 / top-5 accuracy per view and over views, and the per-sample prediction records written into RUN.

Multi-view testing as Video Swin's Kinetics protocol (4 clips x 3 crops): the softmax scores of all views of a sample
are averaged, then ranked. Samples without a label (-1) are left out of the metrics and kept in the predictions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcache.common.errors import InputError
from fcache.common.files import atomic_file

PREDICTIONS = "predictions.jsonl"
AVERAGED = "avg"  # metric family of the views' mean scores
TOPK = (1, 5)
TOPK_NAMES = tuple(f"top{k}" for k in TOPK)  # the metric names of a family


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: whether each label is among the ``k`` highest of its row of ``scores`` (N, K); k is capped at K."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: the lower class index ranks first
    return (top == labels[:, None]).any(axis=1)


def score_views(probs: np.ndarray, labels: np.ndarray, view_names: Sequence[str]) -> dict[str, float]:
    """``avg/top1``, ``avg/top5`` of the mean over views, then ``<view>/top1``, ``<view>/top5`` of each view alone.

    Args:
        probs: (N, V, K) softmax scores of every view of every sample.
        labels: (N,) class indices; samples labelled -1 are not scored.
        view_names: the V view names (``manifest.view_names``).
    """
    if probs.ndim != 3 or probs.shape[1] != len(view_names) or len(labels) != len(probs):
        raise ValueError(f"scores {probs.shape} do not match {len(labels)} labels and views {list(view_names)}")
    keep = labels >= 0
    if not keep.any():
        raise InputError("no evaluated sample has a label; evaluate on a labelled store")
    probs, labels = probs[keep], labels[keep]
    out: dict[str, float] = {}
    for family, scores in ((AVERAGED, probs.mean(axis=1)), *((name, probs[:, v]) for v, name in enumerate(view_names))):
        for k in TOPK:
            out[f"{family}/top{k}"] = float(topk_hits(scores, labels, k).mean())
    return out


def prediction_records(
    keys: Sequence[str], labels: np.ndarray, probs: np.ndarray, view_names: Sequence[str], label_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One JSON record per sample: key, label, the top-5 classes of the averaged scores with their scores, each view's top-1."""
    mean = probs.mean(axis=1)  # (N, K)
    top = np.argsort(-mean, axis=1, kind="stable")[:, : min(5, mean.shape[1])]
    per_view = probs.argmax(axis=2)  # (N, V)
    records = []
    for n, key in enumerate(keys):
        label = int(labels[n])
        records.append(
            {
                "key": str(key),
                "label": label,
                "label_name": label_names[label] if label >= 0 else None,
                "pred": int(top[n, 0]),
                "pred_name": label_names[int(top[n, 0])],
                "top5": [int(c) for c in top[n]],
                "top5_scores": [round(float(mean[n, c]), 6) for c in top[n]],
                "views": {name: int(per_view[n, v]) for v, name in enumerate(view_names)},
            }
        )
    return records


def write_predictions(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """RUN/predictions.jsonl, one line per sample, replaced atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
