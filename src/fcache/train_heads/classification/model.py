"""The linear probe: masked global average pooling of one stored level + dropout + a linear classifier.

Pooling covers only the feature cells over image content (``ceil(valid / stride)`` of each view's geometry), so the
padding of the resize + pad canvas never dilutes the pooled vector; the classifier follows mmaction2's I3DHead
(dropout, then a linear layer initialised with std 0.01), which the paper's video "Linear" head also is.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

CLASSIFIER_STD = 0.01  # mmaction2 I3DHead's init_std


class Classifier(nn.Module):
    """Dropout + linear layer from pooled features to class logits (shared by the classification and video heads)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)
        trunc_normal_(self.fc.weight, std=CLASSIFIER_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x))  # (B, D) -> (B, K)


class LinearProbe(nn.Module):
    """Average pool over the content cells of a (B, C, H, W) map of the given stride, then :class:`Classifier`."""

    def __init__(self, channels: int, num_classes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.stride = stride
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor, content: Tensor | None = None) -> Tensor:
        """Logits (B, K) of features ``x`` (B, C, H, W).

        Args:
            x: (B, C, H, W) features of one level.
            content: (B, 2) height and width of each view's image content on the canvas (``Geometry.valid_h/valid_w``);
                pooling then covers the ``ceil(content / stride)`` top-left cells. None: the whole map.
        """
        if content is None:
            return self.classifier(x.mean((2, 3)))
        cells = torch.ceil(content.to(x.device, torch.float32) / self.stride).long().clamp(min=1)  # (B, 2)
        rows = torch.arange(x.shape[2], device=x.device)[None, :, None] < cells[:, 0, None, None]  # (B, H, 1)
        cols = torch.arange(x.shape[3], device=x.device)[None, None, :] < cells[:, 1, None, None]  # (B, 1, W)
        mask = (rows & cols).to(x.dtype)[:, None]  # (B, 1, H, W)
        pooled = (x * mask).sum((2, 3)) / mask.sum((2, 3))  # (B, C)
        return self.classifier(pooled)
