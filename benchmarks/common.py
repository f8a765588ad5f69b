"""Helpers shared by the benchmark scripts: real photos, result files, tables."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).with_name("results")

PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "ihc.png",
    "retina.jpg",
)


def photos(n: int) -> list[np.ndarray]:
    """n RGB uint8 photos shipped inside scikit-image (cycled when n > 8)."""
    import skimage.data
    from PIL import Image

    root = Path(skimage.data.__file__).parent
    return [np.asarray(Image.open(root / PHOTOS[k % len(PHOTOS)]).convert("RGB")) for k in range(n)]


def photo_folder(root: Path, n: int, size: tuple[int, int] | None = None) -> Path:
    """``root/all/<k>.jpg``: n photos (resized to ``size`` = (w, h) when given), as a ``--dataset folder`` root."""
    from PIL import Image

    (root / "all").mkdir(parents=True)
    for k, img in enumerate(photos(n)):
        pil = Image.fromarray(img)
        (pil.resize(size) if size else pil).save(root / "all" / f"{k:04d}.jpg", quality=90)
    return root


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A Markdown table of rows (dicts) over cols."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
