"""Depth maps between the store, the views, files and pictures.

Training targets follow a view exactly as label maps do (``segmentation.targets.view_labels``: nearest neighbour at the
pixel centres the view's image was sampled at, 0 = no measurement outside the content), so no depth is ever blended
across an edge. Predicted depth is written as 16-bit PNGs in millimetres (0 to 65.535 m, what NYU-Depth v2's tools
read) and drawn with a matplotlib colour map, near bright, far dark, pixels without a measurement black.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from fcache.spec import Geometry
from fcache.train_heads.segmentation.targets import view_labels

MM_PER_M = 1000.0
COLOUR_MAP = "magma_r"


def view_depth(depth: np.ndarray, g: Geometry) -> np.ndarray:
    """(canvas, canvas) float32 metres of one view from the stored (Hmax, Wmax) map; 0 outside the content."""
    return view_labels(np.asarray(depth, dtype=np.float32), g, fill=0.0)


def depth_png(metres: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) depth map: 16-bit grey, millimetres (rounded, clipped to 0..65535)."""
    mm = np.clip(np.round(np.asarray(metres, dtype=np.float64) * MM_PER_M), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG")
    return buf.getvalue()


def read_depth_png(path: str | Path | bytes) -> np.ndarray:
    """(H, W) float32 metres of a depth PNG in millimetres (0 stays 0: no measurement)."""
    im = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    return (np.asarray(im).astype(np.float32) / MM_PER_M).astype(np.float32)


def colour(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """(H, W, 3) uint8: ``depth`` (metres) in the colour map over [near, far]; black where it is 0 (no measurement)."""
    from matplotlib import colormaps

    span = max(far - near, 1e-6)
    rgb = colormaps[COLOUR_MAP](np.clip((depth - near) / span, 0.0, 1.0))[..., :3]
    return np.where((depth > 0)[..., None], np.round(255 * rgb), 0).astype(np.uint8)


def depth_range(*maps: np.ndarray | None) -> tuple[float, float]:
    """(near, far): the smallest and largest measured depth of the maps, so maps drawn side by side share one scale."""
    values = [m[m > 0] for m in maps if m is not None and (m > 0).any()]
    if not values:
        return 0.0, 1.0
    return float(min(v.min() for v in values)), float(max(v.max() for v in values))
