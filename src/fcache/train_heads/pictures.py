"""Pictures of an evaluation's predictions for TensorBoard and W&B, made from the files it wrote into RUN/eval/<store>/.

A store holds features, not images, so the pictures show the predictions alone: detection boxes and masks (the ten
best-scoring per image, torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks``) on a grey canvas of the
image's size, segmentation's predicted label maps in the class palette, and for classification and video the confusion
matrix of the averaged views (rows: true class, normalised; brighter: more). The first ``LIMIT`` samples of each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fcache.train_heads.runfolder import DETECTIONS

LIMIT = 4  # pictures of one evaluation
PER_IMAGE = 10  # detections drawn per picture
MIN_SIDE = 256  # pictures are enlarged (nearest neighbour) to at least this long side


def detection(folder: Path) -> dict[str, np.ndarray]:
    from pycocotools import mask as mask_utils
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    path = folder / DETECTIONS
    detections = json.loads(path.read_text()) if path.is_file() else []
    images: dict[int, list[dict]] = {}
    for d in detections:
        images.setdefault(int(d["image_id"]), []).append(d)
    out = {}
    for image_id in sorted(images)[:LIMIT]:
        best = sorted(images[image_id], key=lambda d: -d["score"])[:PER_IMAGE]
        sizes = [d["segmentation"]["size"] for d in best if "segmentation" in d]
        extent = (max(int(d["bbox"][1] + d["bbox"][3]) for d in best), max(int(d["bbox"][0] + d["bbox"][2]) for d in best))
        h, w = sizes[0] if sizes else extent
        canvas = torch.full((3, max(h, 1), max(w, 1)), 96, dtype=torch.uint8)
        if sizes:
            masks = np.stack([mask_utils.decode(d["segmentation"]) for d in best if "segmentation" in d]).astype(bool)
            canvas = draw_segmentation_masks(canvas, torch.from_numpy(masks), alpha=0.4)
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (d["bbox"] for d in best)], dtype=torch.float32)
        labels = [f"{d['category_id']} {d['score']:.2f}" for d in best]
        canvas = draw_bounding_boxes(canvas, boxes, labels=labels, colors="yellow")
        out[f"detections/{image_id}"] = enlarge(canvas.permute(1, 2, 0).numpy())
    return out


def segmentation(folder: Path) -> dict[str, np.ndarray]:
    files = sorted((folder / "labels").rglob("*.png"))[:LIMIT]
    return {f"labels/{p.relative_to(folder / 'labels').with_suffix('')}": enlarge(np.asarray(Image.open(p).convert("RGB"))) for p in files}


def confusion(folder: Path) -> dict[str, np.ndarray]:
    path = folder / "predictions.jsonl"
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


PICTURES: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "detection": detection,
    "segmentation": segmentation,
    "classification": confusion,
    "video": confusion,
}


def pictures(task: str, folder: Path) -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 picture of the evaluation whose files are in ``folder``; {} for a task without pictures."""
    make = PICTURES.get(task)
    return make(folder) if make is not None else {}


def enlarge(image: np.ndarray) -> np.ndarray:
    """``image`` scaled up by a whole factor (nearest neighbour) until its long side is at least MIN_SIDE."""
    f = max(1, -(-MIN_SIDE // max(image.shape[:2])))
    return np.ascontiguousarray(image.repeat(f, axis=0).repeat(f, axis=1)) if f > 1 else image
