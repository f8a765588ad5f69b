"""Label maps over the image (``fcache predict --draw`` of a segmentation head): the class palette of
``labelmaps.py`` blended over the enlarged image (nearest neighbour), with a legend of the classes present."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from fcache.train_heads.drawing import enlarge, font
from fcache.train_heads.segmentation.labelmaps import IGNORE, palette


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
