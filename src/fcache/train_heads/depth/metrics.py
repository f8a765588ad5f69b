"""Depth metrics of the NYU-Depth v2 protocol (Eigen et al. 2014), on the pixels with a ground truth (> 0) at the
original resolution, per image and then averaged over the images (as BTS, AdaBins and DINOv2's depth toolbox do):

- ``RMSE`` = sqrt(mean((d - d*)^2)) in metres (lower is better, the main metric);
- ``AbsRel`` = mean(|d - d*| / d*); ``log10`` = mean(|log10 d - log10 d*|) (lower is better);
- ``d1``, ``d2``, ``d3`` = the share of pixels with max(d / d*, d* / d) < 1.25, 1.25^2, 1.25^3 (higher is better).

``crop=nyu`` scores only Eigen's crop of NYU's 480 x 640 frames (rows 45-470, columns 41-600, scaled to other sizes).
Each image also counts its pixels, d1 hits and absolute relative errors per range of true depth (five equal ranges up to
the head's ``max_depth``, and beyond), for the per-range table of ``fcache report --per-class``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("RMSE", "AbsRel", "log10", "d1", "d2", "d3")
THRESHOLDS = (1.25, 1.25**2, 1.25**3)
CROPS = ("none", "nyu")
NYU_FRAME, NYU_CROP = (480, 640), (45, 471, 41, 601)  # Eigen's crop: rows [45, 471), columns [41, 601)
RANGES = 5  # equal ranges of true depth up to max_depth (and one beyond) in the per-range table
TINY = 1e-6  # predictions are kept above this in the logarithms and ratios


def crop_mask(h: int, w: int, crop: str) -> np.ndarray:
    """(h, w) bool: the pixels the protocol scores (all, or Eigen's NYU crop scaled to h x w)."""
    mask = np.ones((h, w), bool)
    if crop == "nyu":
        (fh, fw), (y0, y1, x0, x1) = NYU_FRAME, NYU_CROP
        mask[:] = False
        mask[round(y0 * h / fh) : round(y1 * h / fh), round(x0 * w / fw) : round(x1 * w / fw)] = True
    return mask


def range_edges(max_depth: float) -> np.ndarray:
    """The lower edges of the per-range table's ranges: 0, max/5, ..., max (the last range is open)."""
    return np.linspace(0.0, max_depth, RANGES + 1)


def range_names(max_depth: float) -> list[str]:
    e = range_edges(max_depth)
    return [f"{a:g}-{b:g} m" for a, b in zip(e[:-1], e[1:], strict=True)] + [f">{e[-1]:g} m"]


def image_scores(pred: np.ndarray, truth: np.ndarray, *, crop: str = "none", max_depth: float = 10.0) -> dict[str, Any] | None:
    """The metrics of one image: ``pred`` and ``truth`` (H, W) metres (truth 0 = no measurement); None without any
    measured pixel. Also ``ranges``: per range of true depth, [pixels, d1 hits, sum of absolute relative errors]."""
    h, w = truth.shape
    valid = (truth > 0) & np.isfinite(truth) & crop_mask(h, w, crop)
    if not valid.any():
        return None
    d, t = np.maximum(pred[valid].astype(np.float64), TINY), truth[valid].astype(np.float64)
    ratio = np.maximum(d / t, t / d)
    rel = np.abs(d - t) / t
    out: dict[str, Any] = {
        "RMSE": float(np.sqrt(np.mean((d - t) ** 2))),
        "AbsRel": float(rel.mean()),
        "log10": float(np.mean(np.abs(np.log10(d) - np.log10(t)))),
    }
    out |= {f"d{k}": float(np.mean(ratio < th)) for k, th in enumerate(THRESHOLDS, start=1)}
    which = np.searchsorted(range_edges(max_depth)[1:], t, side="right")  # 0 .. RANGES
    counts = np.bincount(which, minlength=RANGES + 1)
    hits = np.bincount(which, weights=ratio < THRESHOLDS[0], minlength=RANGES + 1)
    rels = np.bincount(which, weights=rel, minlength=RANGES + 1)
    out["ranges"] = np.stack([counts, hits, rels], axis=1).tolist()
    return out


def mean_scores(scores: Iterable[Mapping[str, Any] | None]) -> tuple[dict[str, float], int]:
    """Each metric's mean over the images that have one, and how many they are (metrics -1 when none has)."""
    scored = [s for s in scores if s is not None]
    return {m: (float(np.mean([s[m] for s in scored])) if scored else -1.0) for m in METRICS}, len(scored)


def range_table(scores: Sequence[Mapping[str, Any] | None], max_depth: float) -> list[dict[str, Any]]:
    """Per range of true depth over every scored pixel of the set: its pixels, d1 and AbsRel (None without pixels)."""
    total = np.zeros((RANGES + 1, 3))
    for s in scores:
        if s is not None:
            total += np.asarray(s["ranges"], dtype=np.float64)
    rows = []
    for name, (n, hits, rels) in zip(range_names(max_depth), total, strict=True):
        rows.append({"range": name, "pixels": int(n), "d1": hits / n if n else None, "AbsRel": rels / n if n else None})
    return rows
