"""UPerNet (Xiao et al., ECCV 2018) on cached features, as mmsegmentation's ``UPerHead`` + ``FCNHead`` auxiliary.

mmseg's UPerHead: pyramid pooling (scales 1, 2, 3, 6; 1x1 ConvModules, then a 3x3 bottleneck) on the deepest level;
its FPN part (1x1 lateral ConvModules on the other levels, top-down bilinear adds, 3x3 fpn ConvModules, the pooling
output as the top); every level resized to the finest, concatenated, ``fpn_bottleneck`` 3x3, dropout 0.1 and a 1x1
``conv_seg``; channels 512. A ConvModule is conv without bias, norm, ReLU. With SwinV2-B's levels (128..1024) and 150
classes that is 33,315,990 parameters, with GN or BN alike (34,534,700 with ``aux=1``).
The FPN part is any neck of ``UPERNET_NECKS``: ``fpn`` is mmseg's (``necks.UPER_FPN``, not detection's torchvision
FPN), ``bifpn`` k BiFPN layers (the paper's Table 10 replacement), ``fpn-res`` detection's. Each takes the pooling
output as its deepest input; the keys UPerNet does not share are the neck's own parameters, given in the head spec
(``upernet:neck=bifpn,checkpoint=1``) or left at their table defaults. A neck's extra level is
fused only when learned (BiFPN's: its last layer computes it, so every node is trained; FPN's max-pooled one not).
The optional auxiliary head (``aux=1``) is mmseg's FCNHead on the second-deepest stored level: 3x3 ConvModule at half
width, dropout 0.1, 1x1 classifier, loss weight 0.4. Cross-entropy (ignore 255) on logits upsampled to the canvas,
averaged over labelled pixels. GroupNorm by default: a pooling branch pools to 1x1, where BatchNorm cannot train on a
batch of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import Geometry, LevelSpec
from fcache.train_heads.necks import NECKS, UPER_FPN, NeckDef
from fcache.train_heads.necks.base import GN_GROUPS, conv_norm_relu
from fcache.train_heads.segmentation.targets import IGNORE, to_canvas, to_original

POOL_SCALES = (1, 2, 3, 6)
DROPOUT = 0.1
AUX_WEIGHT = 0.4
# UPerNet's FPN part: mmseg's UPerHead one for "fpn" (detection's "fpn" is torchvision's, as mmdet's), the other necks as they are
UPERNET_NECKS: dict[str, NeckDef] = {**NECKS, "fpn": UPER_FPN}


def classifier(channels: int, num_classes: int) -> nn.Sequential:
    """Dropout2d then a 1x1 conv, initialised N(0, 0.01) as mmseg's ``conv_seg``."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(cast(Tensor, conv.bias))
    return nn.Sequential(nn.Dropout2d(DROPOUT), conv)


def cross_entropy(logits: Tensor, stride: int, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labelled canvas pixels of (B, K, h, w) logits against (B, S, S) labels; 0 when none is."""
    up = to_canvas(logits.float(), stride, labels.shape[-1])  # (B, K, S, S)
    total = F.cross_entropy(up, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def fcn_head(in_channels: int, channels: int, num_classes: int, norm: str) -> nn.Sequential:
    """mmseg's FCNHead with one conv: 3x3 conv-norm-ReLU, then the classifier."""
    if norm == "gn" and channels % GN_GROUPS:
        raise InputError(f"upernet: aux=1 with norm=gn needs channels divisible by {2 * GN_GROUPS} (the aux head is half as wide)")
    return nn.Sequential(conv_norm_relu(in_channels, channels, 3, norm), classifier(channels, num_classes))


class PPM(nn.Module):
    """Pyramid pooling module: adaptive average pools, 1x1 conv each, upsampled, concatenated with the input, 3x3 bottleneck."""

    def __init__(self, in_channels: int, channels: int, norm: str) -> None:
        super().__init__()
        # the 1x1 pooled branch has one value per channel and sample: GN with one channel per group would normalise
        # single values (a constant branch, and an error for a batch of 1); BN needs a batch of 2 to train
        if norm == "gn" and channels < 2 * GN_GROUPS:
            raise InputError(f"upernet: norm=gn needs channels of at least {2 * GN_GROUPS} (got {channels}); or use norm=bn")
        self.bn = norm == "bn"
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_norm_relu(in_channels, channels, 1, norm)) for s in POOL_SCALES
        )
        self.bottleneck = conv_norm_relu(in_channels + len(POOL_SCALES) * channels, channels, 3, norm)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn and self.training and x.shape[0] < 2:
            raise InputError("upernet with norm=bn trains on batches of at least 2 (BatchNorm of the 1x1 pooled branch); "
                             "give --batch-size 2 or more, or use norm=gn")  # fmt: skip
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))  # (B, channels, H, W)


class UPerNet(nn.Module):
    """PPM -> neck (the FPN part) -> fpn_bottleneck -> classifier (+ FCN auxiliary head) over 2 or more stored levels."""

    def __init__(
        self, levels: Sequence[LevelSpec], *, neck: str, neck_params: Mapping[str, Any], channels: int, norm: str, aux: bool,
        num_classes: int,
    ) -> None:  # fmt: skip
        super().__init__()
        ins = tuple(sorted(levels, key=lambda lv: lv.stride))
        if len(ins) < 2:
            raise InputError(f"upernet needs at least 2 feature levels; it was given: {', '.join(lv.name for lv in ins) or 'none'}")
        self.in_levels, self.num_classes = ins, num_classes
        top = ins[-1]
        self.ppm = PPM(top.channels, channels, norm)
        neck_in = (*ins[:-1], LevelSpec(top.name, channels, top.stride))
        self.neck = UPERNET_NECKS[neck].build(neck_in, neck_params)
        self.fused = self.neck.learned_levels  # pyramid levels fused, fine first
        self.fuse = conv_norm_relu(len(self.fused) * channels, channels, 3, norm)
        self.cls = classifier(channels, num_classes)
        self.aux = fcn_head(ins[-2].channels, channels // 2, num_classes, norm) if aux else None

    @property
    def stride(self) -> int:
        return self.in_levels[0].stride

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``logits`` (B, K, H_0, W_0) at the finest stored stride; ``aux`` (B, K, H, W) at the second-deepest when enabled."""
        top = self.in_levels[-1].name
        x = {lv.name: features[lv.name] for lv in self.in_levels}
        x[top] = self.ppm(x[top])
        pyramid = self.neck(x)  # level -> (B, channels, H_l, W_l), plus the neck's extra level
        size = pyramid[self.in_levels[0].name].shape[-2:]
        maps = [F.interpolate(pyramid[lv.name], size=size, mode="bilinear", align_corners=False) for lv in self.fused]
        out = {"logits": self.cls(self.fuse(torch.cat(maps, dim=1)))}
        if self.aux is not None and self.training:
            out["aux"] = self.aux(features[self.in_levels[-2].name])
        return out

    def losses(self, out: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """``ce`` (and ``aux_ce`` x 0.4) against (B, S, S) int64 canvas labels."""
        losses = {"ce": cross_entropy(out["logits"], self.stride, labels)}
        if "aux" in out:
            losses["aux_ce"] = AUX_WEIGHT * cross_entropy(out["aux"], self.in_levels[-2].stride, labels)
        return losses

    def probabilities(self, out: Mapping[str, Tensor], j: int, g: Geometry) -> Tensor:
        """(K, orig_h, orig_w) class probabilities of view ``j`` of the batch: logits resized to the original, then softmax."""
        return to_original(out["logits"][j], self.stride, g).softmax(dim=0)


def build_upernet(levels: Sequence[LevelSpec], p: Mapping[str, Any], num_classes: int) -> UPerNet:
    """UPerNet of head parameters ``p``: the neck takes the upernet keys it shares and its own as the spec gave them
    (typed), else their table defaults."""
    neck_params = {k: p.get(k, q.default) for k, q in UPERNET_NECKS[p["neck"]].params.items()}
    return UPerNet(
        levels, neck=p["neck"], neck_params=neck_params, channels=p["channels"], norm=p["norm"], aux=p["aux"], num_classes=num_classes
    )
