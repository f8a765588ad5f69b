"""Boxes and masks over the image (``fcache predict --draw`` of a detection head, the demo's pictures).

Drawn with ``torchvision.utils.draw_bounding_boxes`` / ``draw_segmentation_masks``. Each detection takes, from a palette
of vivid colours, the one farthest from the image pixels under its mask (or box), so a mask never disappears into the
object it covers; its label and score sit on a filled tag in that colour, in black or white text, whichever contrasts.
Small images are enlarged first so text stays legible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from fcache.train_heads.drawing import contrasting, enlarge, font_path, text_colour


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)).astype(bool)


def draw_detections(image: np.ndarray, detections: Sequence[Mapping[str, Any]], *, scores: bool = True) -> np.ndarray:
    """(H', W', 3) uint8: ``image`` enlarged with each detection's mask, box and ``name score`` tag.

    Args:
        detections: COCO records in original pixels (``bbox`` xywh, optional RLE ``segmentation``, ``category_name``
            or ``category_id``, optional ``score``).
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    big, f = enlarge(image)
    h, w = big.shape[:2]
    if not detections:
        return big
    masks, boxes, colours, labels = [], [], [], []
    for d in detections:
        x, y, bw, bh = (float(v) * f for v in d["bbox"])
        box = np.zeros((h, w), bool)
        box[int(y) : int(np.ceil(y + bh)), int(x) : int(np.ceil(x + bw))] = True
        m = _resize_mask(_decode_mask(d["segmentation"], *image.shape[:2]), (w, h)) if d.get("segmentation") else None
        colours.append(contrasting(big, m if m is not None and m.any() else box))
        masks.append(m if m is not None else np.zeros((h, w), bool))
        boxes.append([x, y, x + bw, y + bh])
        name = str(d.get("category_name") or d.get("category_id", ""))
        labels.append(f"{name} {d['score']:.2f}" if scores and "score" in d else name)
    t = torch.from_numpy(np.array(big)).permute(2, 0, 1).contiguous()  # (3, H, W)
    if any(m.any() for m in masks):
        t = draw_segmentation_masks(t, torch.from_numpy(np.stack(masks)), alpha=0.45, colors=colours)
    size = max(12, round(max(h, w) / 40))
    t = draw_bounding_boxes(
        t, torch.tensor(boxes, dtype=torch.float32), labels=labels, colors=colours, width=max(2, size // 6), font=font_path(),
        font_size=size, label_colors=[text_colour(c) for c in colours], label_background_colors=colours, fill_labels=True,
    )  # fmt: skip
    return t.permute(1, 2, 0).numpy()


def _decode_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """(h, w) mask of a COCO segmentation: RLE (compressed or not) or polygons."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        seg = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        seg = mask_utils.frPyObjects(seg, h, w)
    return np.asarray(mask_utils.decode(seg))
