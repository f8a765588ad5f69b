"""mIoU, per-class IoU and accuracies from a confusion matrix accumulated over the evaluated set (mmsegmentation's
``IoUMetric``): pixels labelled ``IGNORE`` are left out; a class neither present nor predicted has no IoU (NaN) and
does not count in the means. Each sample contributes a sparse confusion (codes ``gt * K + pred`` and their counts),
so evaluating thousands of images holds counts, not label maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fcache.common.errors import InputError
from fcache.train_heads.segmentation.targets import IGNORE

Sparse = tuple[np.ndarray, np.ndarray]  # (codes gt * K + pred, counts)


def confusion_codes(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> Sparse:
    """Sparse confusion of one label map: ``pred`` and ``gt`` (H, W) class indices, ``gt == IGNORE`` left out.

    Raises:
        ValueError: a ground-truth label outside 0..K-1 other than ``IGNORE`` (the store does not match the head).
    """
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    if g.size and g.max() >= num_classes:
        raise InputError(f"ground-truth label {int(g.max())} is outside the head's {num_classes} classes")
    codes, counts = np.unique(g * num_classes + pred[valid].astype(np.int64), return_counts=True)
    return codes, counts.astype(np.int64)


def accumulate(parts: Iterable[Sparse], num_classes: int) -> np.ndarray:
    """(K, K) int64 confusion matrix, rows ground truth, columns prediction, summed over ``parts``."""
    total = np.zeros(num_classes * num_classes, dtype=np.int64)
    for codes, counts in parts:
        np.add.at(total, codes, counts)
    return total.reshape(num_classes, num_classes)


def scores(conf: np.ndarray) -> dict[str, Any]:
    """``mIoU``, ``mAcc``, ``aAcc`` (0..1) and per-class ``IoU``/``Acc`` lists (None where undefined) of a confusion matrix."""
    conf = conf.astype(np.float64)
    inter = np.diag(conf)
    gt_area, pred_area = conf.sum(1), conf.sum(0)
    union = gt_area + pred_area - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(gt_area > 0, inter / gt_area, np.nan)
    total = conf.sum()
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(inter.sum() / total) if total else float("nan"),
        "IoU": _listed(iou),
        "Acc": _listed(acc),
    }


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _listed(x: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in x]


def per_class_table(names: Sequence[str], result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per class: name, IoU and Acc (None where the class was neither present nor predicted)."""
    return [{"class": n, "IoU": i, "Acc": a} for n, i, a in zip(names, result["IoU"], result["Acc"], strict=True)]
