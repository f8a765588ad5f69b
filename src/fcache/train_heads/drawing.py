"""What every task's drawings of predictions share (``fcache predict --draw``): legible text, colours that stand out
from the pixels under them, pictures enlarged so text stays legible, panels side by side with titles, PNG files.

Text is DejaVu Sans (shipped with matplotlib) sized to the picture; the tasks' own drawings are in their packages
(``detection/draw.py``: boxes and masks, ``segmentation/draw.py``: label maps, ``depth/outputs.py``: depth maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def contrasting(image: np.ndarray, region: np.ndarray) -> tuple[int, int, int]:
    """The palette colour farthest (RGB distance) from the mean of ``image`` under the boolean ``region``."""
    pixels = image[region] if region.any() else image.reshape(-1, 3)
    mean = pixels.reshape(-1, 3).mean(axis=0)
    best = VIVID[np.argmax(((VIVID - mean) ** 2).sum(axis=1))]
    return int(best[0]), int(best[1]), int(best[2])


def text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


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
