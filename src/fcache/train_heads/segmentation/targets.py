"""Label maps into a view's canvas (training targets) and per-view predictions back to the original image.

Both directions go through the stored ``fcache.spec.Geometry``. Labels move nearest-neighbour at the pixel centres
the extractor's ``render`` sampled (its resize box, so the rounding of the resized size is followed too: a label
lands exactly on the pixel the backbone saw). Scores move bilinearly as mmsegmentation and detectron2 do at test
time: upsampled to the canvas, cropped to the content, un-flipped, resized to the original size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fcache.common.errors import InputError
from fcache.spec import Geometry, Targets

IGNORE = Targets.IGNORE


def content_size(g: Geometry) -> tuple[int, int]:
    """(valid_h, valid_w) of a view's content on its canvas, in whole pixels."""
    s = round(g.canvas)
    return min(round(g.valid_h), s), min(round(g.valid_w), s)


def original_size(g: Geometry) -> tuple[int, int]:
    return round(g.orig_h), round(g.orig_w)


def _source_index(n: int, offset: int, scale: float, limit: int, resized: bool) -> np.ndarray:
    """Original pixel under each of ``n`` content pixels along one axis, as the extractor's ``render`` samples it.

    A resized view maps the box ``[offset / scale, min(limit, (offset + n) / scale))`` of the original onto the ``n``
    pixels (pixel k's centre at ``box0 + (k + 0.5) * box_len / n``); otherwise the view is a plain crop. -1: outside.
    """
    if resized:
        lo, hi = offset / scale, min(limit, (offset + n) / scale)
        idx = np.floor(lo + (np.arange(n) + 0.5) * (hi - lo) / n).astype(np.int64)
    else:
        idx = offset + np.arange(n)
    return np.where((idx >= 0) & (idx < limit), idx, -1)


def view_labels(label: np.ndarray, g: Geometry, fill: float = IGNORE) -> np.ndarray:
    """(canvas, canvas) labels of one view from the stored (Hmax, Wmax) map, in its dtype (uint8 labels; float32 depth);
    ``fill`` outside the content.

    Nearest neighbour at the pixel centres the view's image was sampled at, so scale, crop and flip follow exactly.
    """
    s = round(g.canvas)
    vh, vw = content_size(g)
    oh, ow = original_size(g)
    resized = (max(1, round(ow * g.scale)), max(1, round(oh * g.scale))) != (ow, oh)
    cols = _source_index(vw, int(g.crop_x0), g.scale, ow, resized)
    rows = _source_index(vh, int(g.crop_y0), g.scale, oh, resized)
    if g.flip:
        cols = cols[::-1]
    r_ok, c_ok = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
    label = np.asarray(label)
    out = np.full((s, s), fill, dtype=label.dtype)
    out[np.ix_(r_ok, c_ok)] = label[np.ix_(rows[r_ok], cols[c_ok])]
    return out


def to_canvas(x: Tensor, stride: int, canvas: int) -> Tensor:
    """(B, C, h, w) maps of a level of ``stride`` -> (B, C, canvas, canvas): bilinear to the area the grid covers, cropped."""
    h, w = x.shape[-2:]
    up = F.interpolate(x, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return up[..., :canvas, :canvas]


def to_original(x: Tensor, stride: int, g: Geometry) -> Tensor:
    """(C, h, w) maps of one view at ``stride`` -> (C, orig_h, orig_w) in original image coordinates.

    Raises:
        ValueError: the view is a crop (only whole-image views, such as the plain and test views, map back).
    """
    if g.crop_x0 or g.crop_y0:
        raise InputError("a cropped view cannot be mapped back to the whole image; evaluate on plain or test views")
    vh, vw = content_size(g)
    content = to_canvas(x[None].float(), stride, round(g.canvas))[0, :, :vh, :vw]  # (C, vh, vw)
    if g.flip:
        content = content.flip(-1)
    return F.interpolate(content[None], size=original_size(g), mode="bilinear", align_corners=False)[0]


def ground_truth(label: np.ndarray, g: Geometry) -> np.ndarray:
    """The stored (Hmax, Wmax) label map cut to the sample's original size: (orig_h, orig_w) uint8."""
    oh, ow = original_size(g)
    return np.asarray(label)[:oh, :ow]


def class_masks(labels: Tensor, size: tuple[int, int]) -> list[tuple[Tensor, Tensor]]:
    """Mask2Former's semantic targets: per view, the classes present (n,) int64 and their masks (n, *size) float.

    Args:
        labels: (B, S, S) int64 canvas labels, ``IGNORE`` where unlabelled.
        size: the area the mask features cover (>= S); masks are zero-padded to it. Ignored pixels belong to no mask,
            as in Mask2Former's semantic dataset mapper.
    """
    out = []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != IGNORE]
        masks = (lab[None] == classes[:, None, None]).float()  # (n, S, S)
        masks = F.pad(masks, (0, size[1] - lab.shape[1], 0, size[0] - lab.shape[0]))
        out.append((classes, masks))
    return out
