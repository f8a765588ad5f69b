"""Pictures of predictions worth putting in a paper: boxes, masks and label maps over the image, ground truth beside.

Boxes and masks are drawn with ``torchvision.utils.draw_bounding_boxes`` / ``draw_segmentation_masks``. Each
detection takes, from a palette of vivid colours, the one farthest from the image pixels under its mask (or box), so a
mask never disappears into the object it covers; its label and score sit on a filled tag in that colour, in black or
white text, whichever contrasts, in DejaVu Sans (shipped with matplotlib) sized to the picture. Small images are
enlarged first (nearest neighbour for the label maps) so text stays legible. Label maps use the class palette of
``train_heads.segmentation.labelmaps`` with a legend of the classes present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fcache.train_heads.segmentation.labelmaps import IGNORE, palette

VIVID = np.array(
    [(255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 64, 0), (0, 255, 64), (64, 96, 255), (255, 0, 128), (128, 255, 0),
     (255, 160, 0), (0, 160, 255), (160, 0, 255), (255, 255, 255)],
    dtype=np.float64,
)  # fmt: skip
MIN_SIDE = 512  # pictures are enlarged to at least this long side


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no matplotlib font: Pillow's own
        return ImageFont.load_default(size)


def font_path() -> str | None:
    try:
        from matplotlib import font_manager

        return str(font_manager.findfont("DejaVu Sans"))
    except Exception:
        return None


def enlarge(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image scaled up (bilinear) so its long side is at least MIN_SIDE, and the factor."""
    h, w = image.shape[:2]
    f = max(1.0, MIN_SIDE / max(h, w))
    if f == 1.0:
        return image, 1.0
    return np.asarray(Image.fromarray(image).resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR)), f


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)).astype(bool)


def contrasting(image: np.ndarray, region: np.ndarray) -> tuple[int, int, int]:
    """The palette colour farthest (RGB distance) from the mean of ``image`` under the boolean ``region``."""
    pixels = image[region] if region.any() else image.reshape(-1, 3)
    mean = pixels.reshape(-1, 3).mean(axis=0)
    best = VIVID[np.argmax(((VIVID - mean) ** 2).sum(axis=1))]
    return int(best[0]), int(best[1]), int(best[2])


def text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


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


def draw_labels(image: np.ndarray, labels: np.ndarray, names: Sequence[str], *, alpha: float = 0.55) -> np.ndarray:
    """(H', W' + legend, 3) uint8: ``image`` enlarged with the label map blended over it in the class palette, and a
    legend of the classes present (largest first, up to 16)."""
    from torchvision.utils import draw_segmentation_masks

    big, _ = enlarge(image)
    h, w = big.shape[:2]
    lab = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
    present = [int(c) for c, _ in sorted(zip(*np.unique(lab, return_counts=True), strict=True), key=lambda p: -p[1]) if c != IGNORE]
    pal = palette(max(len(names), 1))
    t = torch.from_numpy(np.array(big)).permute(2, 0, 1).contiguous()
    if present:
        masks = torch.from_numpy(np.stack([lab == c for c in present]))
        t = draw_segmentation_masks(t, masks, alpha=alpha, colors=[tuple(int(v) for v in pal[c]) for c in present])
    picture = Image.fromarray(t.permute(1, 2, 0).numpy())
    size = max(12, round(max(h, w) / 40))
    legend = Image.new("RGB", (w, (size + 6) * ((min(len(present), 16) + 1) // 2) + 6), (255, 255, 255))
    draw, fnt = ImageDraw.Draw(legend), font(size)
    for k, c in enumerate(present[:16]):
        x0, y0 = 6 + (k % 2) * (w // 2), 6 + (k // 2) * (size + 6)
        draw.rectangle([x0, y0, x0 + size, y0 + size], fill=tuple(int(v) for v in pal[c]), outline=(0, 0, 0))
        draw.text((x0 + size + 6, y0), names[c] if c < len(names) else str(c), fill=(0, 0, 0), font=fnt)
    out = Image.new("RGB", (w, h + legend.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(legend, (0, h))
    return np.asarray(out)


def side_by_side(panels: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Pictures in a row, each under its title, on white, at a common height."""
    h = max(p.shape[0] for _, p in panels)
    size = max(14, round(h / 30))
    fnt, bar = font(size), size + 10
    width = sum(p.shape[1] for _, p in panels) + 8 * (len(panels) - 1)
    out = Image.new("RGB", (width, h + bar), (255, 255, 255))
    draw, x = ImageDraw.Draw(out), 0
    for title, p in panels:
        draw.text((x + 4, 4), title, fill=(0, 0, 0), font=fnt)
        out.paste(Image.fromarray(p), (x, bar))
        x += p.shape[1] + 8
    return np.asarray(out)


def save_png(picture: np.ndarray, path: Any) -> None:
    Image.fromarray(picture).save(path)
