"""Views: deterministic preprocessings of a sample, so that a cache can still be augmented.

Images: view ``plain`` resizes the longest side to the canvas and pads (bottom/right); with
``views=K > 1`` every training view is a seeded random resize (scale in ``view_scale`` of the
plain size, the paper's large-scale jitter) + random crop to the canvas + optional flip. Test
views follow: ``flip`` (plain, mirrored) and ``ms`` (plain at 0.5 and 0.75, and their flips when
``flip`` is asked too): the canvas is fixed, so multi-scale test views only scale down.
Video: the short side is resized to the canvas and ``crops`` square crops are spread along the
long side (1: centre, 3: left/centre/right, the Kinetics 4x3 protocol), for each temporal clip.
A view's randomness comes from (seed, key) only: independent of order, batch and workers.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from PIL import Image

from fcache.extract.manifests import expand_test_views
from fcache.spec import Geometry, Preprocessing

__all__ = ["expand_test_views", "image_views", "render", "video_views"]


def sample_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng((seed, zlib.crc32(key.encode("utf-8"))))


def image_views(h: int, w: int, pre: Preprocessing, canvas: int, key: str, orientation: int = 1) -> list[Geometry]:
    """Geometry of every view of an (h, w) image: the training views, then the test views."""
    base = canvas / max(h, w)
    common = {"orig_h": float(h), "orig_w": float(w), "canvas": float(canvas), "orientation": float(orientation)}
    if pre.views == 1:
        views = [_fit(base, h, w, canvas, common)]
    else:
        rng = sample_rng(pre.seed, key)
        views = [_jitter(rng, base, h, w, canvas, pre, common) for _ in range(pre.views)]
    for name in pre.test_views:
        scale_txt, _, flip = name.removeprefix("s").partition("+")
        scale = base * (1.0 if name == "flip" else float(scale_txt))
        g = _fit(scale, h, w, canvas, common)
        views.append(Geometry(**{**g.to_dict(), "flip": 1.0 if "flip" in (name, flip) else 0.0}))
    return views


def _fit(scale: float, h: int, w: int, canvas: int, common: dict) -> Geometry:
    rw, rh = _resized(w, h, scale)
    return Geometry(scale=scale, valid_w=float(min(rw, canvas)), valid_h=float(min(rh, canvas)), **common)


def _jitter(rng: np.random.Generator, base: float, h: int, w: int, canvas: int, pre: Preprocessing, common: dict) -> Geometry:
    lo, hi = pre.view_scale
    scale = base * float(rng.uniform(lo, hi))
    rw, rh = _resized(w, h, scale)
    x0 = int(rng.integers(0, rw - canvas + 1)) if rw > canvas else 0
    y0 = int(rng.integers(0, rh - canvas + 1)) if rh > canvas else 0
    flip = float(pre.view_flip and rng.random() < 0.5)
    return Geometry(
        scale=scale,
        crop_x0=float(x0),
        crop_y0=float(y0),
        valid_w=float(min(rw - x0, canvas)),
        valid_h=float(min(rh - y0, canvas)),
        flip=flip,
        **common,
    )


def video_views(h: int, w: int, pre: Preprocessing, canvas: int, clip_times: list[tuple[float, float]]) -> list[Geometry]:
    """Geometry of each clip x crop view of an (h, w) video; clip_times are (start, end) seconds."""
    scale = canvas / min(h, w)
    rw, rh = _resized(w, h, scale)
    long_x = rw >= rh
    span = (rw if long_x else rh) - canvas
    offsets = [span // 2] if pre.crops == 1 else [round(k * span / (pre.crops - 1)) for k in range(pre.crops)]
    views = []
    for t0, t1 in clip_times:
        for off in offsets:
            views.append(
                Geometry(
                    orig_h=float(h),
                    orig_w=float(w),
                    scale=scale,
                    crop_x0=float(off if long_x else 0),
                    crop_y0=float(0 if long_x else off),
                    valid_w=float(min(rw, canvas)),
                    valid_h=float(min(rh, canvas)),
                    canvas=float(canvas),
                    t_start=t0,
                    t_end=t1,
                )
            )
    return views


def _resized(w: int, h: int, scale: float) -> tuple[int, int]:
    return max(1, round(w * scale)), max(1, round(h * scale))


def render(image: np.ndarray, g: Geometry, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Cut one view out of an (H, W, 3) uint8 image: (3, S, S) float32, normalised, zero padding."""
    h, w = image.shape[:2]
    rw, rh = _resized(w, h, g.scale)
    pil = Image.fromarray(image)
    x0, y0, vw, vh = int(g.crop_x0), int(g.crop_y0), int(g.valid_w), int(g.valid_h)
    if (rw, rh) != (w, h):
        # resize only the region the crop keeps (plus a margin), as if the whole image were resized
        box = (x0 / g.scale, y0 / g.scale, min(w, (x0 + vw) / g.scale), min(h, (y0 + vh) / g.scale))
        pil = pil.resize((vw, vh), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        arr = np.asarray(pil)
    else:
        arr = np.asarray(pil)[y0 : y0 + vh, x0 : x0 + vw]
    if g.flip:
        arr = arr[:, ::-1]
    s = int(g.canvas)
    out = torch.zeros(3, s, s, dtype=torch.float32)
    pix = out[:, :vh, :vw]  # (3, vh, vw), normalised in place
    pix.copy_(torch.from_numpy(np.array(arr)).permute(2, 0, 1)).div_(255)
    pix.sub_(torch.tensor(mean, dtype=torch.float32)[:, None, None]).div_(torch.tensor(std, dtype=torch.float32)[:, None, None])
    return out
