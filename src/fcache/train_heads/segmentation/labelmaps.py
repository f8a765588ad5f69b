"""Predicted label maps as files: indexed PNGs at original resolution with a class palette (what eval and predict write).

The palette gives class k a colour of its own, spread around the hue circle by the golden ratio (so neighbouring
classes differ), at two alternating lightnesses; index 255 (ignore) is black. A label PNG opens as the class indices
(``read_label_png``) in any image library, and as a coloured map in any viewer.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE = 255
GOLDEN = 0.618033988749895


def palette(n: int) -> np.ndarray:
    """(max(n, 256), 3) uint8 colours: class k's colour at row k, black at 255."""
    rows = np.zeros((max(n, 256), 3), np.uint8)
    for k in range(n):
        h, light = (k * GOLDEN) % 1.0, (0.5, 0.35)[k % 2]
        rows[k] = np.round(np.array(colorsys.hls_to_rgb(h, light, 0.85)) * 255)
    if n <= IGNORE:
        rows[IGNORE] = 0
    return rows


def label_png(labels: np.ndarray, num_classes: int) -> bytes:
    """PNG bytes of an (H, W) map of class indices: indexed with the class palette (K <= 255), 16-bit grey beyond."""
    if num_classes <= IGNORE:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        im.putpalette(palette(num_classes)[:256].ravel().tolist())
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def read_label_png(path: str | Path | bytes) -> np.ndarray:
    """The (H, W) class indices of a label PNG (its palette ignored)."""
    im = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    return np.asarray(im)
