"""COCO annotations into a view's canvas coordinates (training targets), and detections back to the original image.

Boxes go through ``fcache.spec.Geometry``; masks are decoded at original resolution with pycocotools (polygons or
RLE) and resampled nearest-neighbour at pixel centres, so boxes and masks follow the same scale, crop and flip.
Crowd annotations are dropped from training targets; so are boxes thinner than ``min_size`` canvas pixels after the crop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.models.detection.roi_heads import paste_masks_in_image

from fcache.common.errors import InputError
from fcache.spec import Geometry

MASK_THRESHOLD = 0.5
MASK_CHUNK = 16  # detections pasted at once: bounds memory at large canvases


def category_labels(categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """COCO category id -> contiguous label 1..K in order of id (0 is the background)."""
    ids = sorted({int(c["id"]) for c in categories})
    return {cid: k + 1 for k, cid in enumerate(ids)}


def content_size(g: Geometry) -> tuple[int, int]:
    """(valid_h, valid_w) of a view's content on its canvas, in whole pixels."""
    return min(round(g.valid_h), round(g.canvas)), min(round(g.valid_w), round(g.canvas))


def original_size(g: Geometry) -> tuple[int, int]:
    return round(g.orig_h), round(g.orig_w)


def annotation_mask(ann: Mapping[str, Any], h: int, w: int) -> np.ndarray:
    """(h, w) uint8 mask of a COCO annotation: polygons, uncompressed or compressed RLE; empty when it has none."""
    seg = ann.get("segmentation")
    if not seg:
        return np.zeros((h, w), np.uint8)
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return np.asarray(mask_utils.decode(rle), dtype=np.uint8)


def _view_sources(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """For each content row / column of the view, the original pixel its centre falls on (-1: outside the image)."""
    vh, vw = content_size(g)
    oh, ow = original_size(g)
    u = np.arange(vw) + 0.5
    if g.flip:
        u = g.valid_w - u
    cols = np.floor((u + g.crop_x0) / g.scale).astype(np.int64)
    rows = np.floor((np.arange(vh) + 0.5 + g.crop_y0) / g.scale).astype(np.int64)
    return np.where((rows >= 0) & (rows < oh), rows, -1), np.where((cols >= 0) & (cols < ow), cols, -1)


def _original_sources(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """For each original row / column, the view content pixel its centre lands on (-1: cropped away)."""
    vh, vw = content_size(g)
    oh, ow = original_size(g)
    x = (np.arange(ow) + 0.5) * g.scale - g.crop_x0
    if g.flip:
        x = g.valid_w - x
    y = (np.arange(oh) + 0.5) * g.scale - g.crop_y0
    cols, rows = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    return np.where((rows >= 0) & (rows < vh), rows, -1), np.where((cols >= 0) & (cols < vw), cols, -1)


def _gather(masks: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """masks (..., H, W) sampled at rows x cols; -1 entries read as 0."""
    out = np.zeros((*masks.shape[:-2], len(rows), len(cols)), dtype=masks.dtype)
    r_ok, c_ok = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
    out[..., r_ok[:, None], c_ok[None, :]] = masks[..., rows[r_ok][:, None], cols[c_ok][None, :]]
    return out


def masks_to_view(masks: np.ndarray, g: Geometry) -> np.ndarray:
    """(..., orig_h, orig_w) -> (..., valid_h, valid_w): the view's content region."""
    return _gather(masks, *_view_sources(g))


def masks_from_view(masks: np.ndarray, g: Geometry) -> np.ndarray:
    """(..., valid_h, valid_w) -> (..., orig_h, orig_w); pixels the view cropped away are 0."""
    return _gather(masks, *_original_sources(g))


def view_targets(
    annotations: Sequence[Mapping[str, Any]], g: Geometry, labels: Mapping[int, int], *, min_size: float = 1.0
) -> dict[str, Tensor]:
    """torchvision targets of one view: ``boxes`` (G, 4) xyxy canvas float32, ``labels`` (G,) int64, ``masks`` (G, vh, vw) uint8."""
    anns = [a for a in annotations if not a.get("iscrowd", 0)]
    unknown = sorted({int(a["category_id"]) for a in anns} - set(labels))
    if unknown:
        raise InputError(f"annotations use category ids {unknown} that are not in the store's categories; the store is inconsistent")
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes = g.boxes_to_view(xyxy, clip=True)  # (G, 4)
    keep = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size))
    vh, vw = content_size(g)
    oh, ow = original_size(g)
    masks = np.zeros((len(keep), vh, vw), np.uint8)
    for j, k in enumerate(keep):
        masks[j] = masks_to_view(annotation_mask(anns[k], oh, ow), g)
    return {
        "boxes": torch.from_numpy(boxes[keep].astype(np.float32)).reshape(-1, 4),
        "labels": torch.tensor([labels[int(anns[k]["category_id"])] for k in keep], dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }


def detections_to_coco(det: Mapping[str, Tensor], g: Geometry, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO result records (original image coordinates, RLE masks) of one view's detections.

    Args:
        det: ``boxes`` (D, 4) canvas xyxy, ``labels`` (D,) 1..K, ``scores`` (D,), optional ``masks`` (D, 1, M, M) probabilities.
        category_ids: COCO id of label k at index k - 1.
    """
    boxes_view = det["boxes"].detach().float().cpu()
    boxes = g.boxes_from_view(boxes_view.numpy())  # (D, 4) original xyxy
    scores = det["scores"].detach().float().cpu().tolist()
    labels = det["labels"].detach().cpu().tolist()
    rles: list[dict[str, Any] | None] = [None] * len(labels)
    if "masks" in det and len(labels):
        rles = list(_mask_rles(det["masks"].detach().float().cpu(), boxes_view, g))
    out = []
    for box, score, label, rle in zip(boxes, scores, labels, rles, strict=True):
        x0, y0, x1, y1 = (float(v) for v in box)
        rec: dict[str, Any] = {"image_id": image_id, "category_id": int(category_ids[label - 1]), "score": float(score)}
        rec["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        if rle is not None:
            rec["segmentation"] = rle
        out.append(rec)
    return out


def _mask_rles(masks: Tensor, boxes: Tensor, g: Geometry, chunk: int = MASK_CHUNK) -> list[dict[str, Any]]:
    """COCO RLEs at original size of (D, 1, M, M) mask probabilities on canvas boxes (D, 4), a chunk at a time."""
    vh, vw = content_size(g)
    out = []
    for start in range(0, len(masks), chunk):
        probs = paste_masks_in_image(masks[start : start + chunk], boxes[start : start + chunk], (vh, vw))[:, 0]  # (d, vh, vw)
        binary = masks_from_view((probs >= MASK_THRESHOLD).numpy().astype(np.uint8), g)  # (d, orig_h, orig_w)
        encoded = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        out += [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in encoded]
    return out
