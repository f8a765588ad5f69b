"""The details in which the detection heads follow mmdetection, and the first release's, which its RUNs keep.

mmdetection (the reference of the cascade and HTC heads) pools RoI features with mmcv's RoIAlign, ``aligned=True``
(pixel centres at +0.5), averages HTC's semantic cross-entropy over every pixel (``avg_non_ignore=False``) and
decodes the third cascade stage with target stds (0.033, 0.033, 0.067, 0.067). fcache 0.1 pooled with torchvision's
``aligned=False``, averaged the semantic loss over labelled pixels only and used weights (30, 30, 15, 15). A RUN
records its conventions in its task description; a RUN without the record was made by 0.1 and keeps 0.1's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops._utils import convert_boxes_to_roi_format

from fcache.common.errors import InputError

CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))  # mmdetection's target_stds


@dataclass(frozen=True)
class Conventions:
    """How RoI features are pooled, HTC's semantic loss is averaged and the cascade stages decode their boxes."""

    aligned: bool  # RoIAlign's pixel-centre offset, for box, mask and semantic RoI features
    semantic_over_all_pixels: bool  # HTC's semantic cross-entropy: mean over all pixels (True) or the labelled ones
    stage_reg_weights: tuple[tuple[float, ...], ...]  # per cascade stage: box-regression weights (1 / target std)


CONVENTIONS: dict[str, Conventions] = {
    "mmdetection": Conventions(True, True, tuple(tuple(1.0 / s for s in stds) for stds in CASCADE_STDS)),
    "0.1": Conventions(False, False, ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))),
}
CURRENT = "mmdetection"  # what new RUNs follow
BEFORE_RECORD = "0.1"  # what a RUN without the record was trained with


def conventions(name: str) -> Conventions:
    if name not in CONVENTIONS:
        raise InputError(f"unknown detection conventions {name!r} in the RUN's task record; this fcache knows {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


class RoIPool(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign with RoIAlign's ``aligned`` choice (torchvision's own pooling when False)."""

    def __init__(self, featmap_names: Sequence[str], output_size: int, sampling_ratio: int, *, aligned: bool) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio=sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if not self.aligned:
            return super().forward(x, boxes, image_shapes)
        assert self.scales is not None and self.map_levels is not None, "scales and levels come from the level strides"
        feats = [x[name] for name in self.featmap_names]
        rois = convert_boxes_to_roi_format(boxes)  # (R, 5): image index, x1, y1, x2, y2
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for k, (feat, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels == k)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out  # (R, C, size, size)
