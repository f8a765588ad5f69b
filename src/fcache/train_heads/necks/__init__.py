"""Necks for multi-scale heads (the paper's Table 2): fpn, fpn-res, bifpn, in a NECKS table with their parameters.

Each builder takes the stored LevelSpecs it reads and the parsed (typed) head parameters, never hard-coded channel counts.
``UPER_FPN`` is UPerNet's FPN part as mmseg's UPerHead builds it (ConvModules with norms, the pyramid pooling as its
top lateral); it is not a detection neck, so it stands outside NECKS (``segmentation.upernet.UPERNET_NECKS`` uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fcache.spec import LevelSpec
from fcache.train_heads.headspec import Param
from fcache.train_heads.necks.base import NORMS, Neck, pyramid_levels
from fcache.train_heads.necks.bifpn import BiFPN
from fcache.train_heads.necks.fpn import FPN
from fcache.train_heads.necks.fpn_res import FPNRes
from fcache.train_heads.necks.uper_fpn import UPerFPN


@dataclass(frozen=True)
class NeckDef:
    """How to build one neck family from levels + parsed parameters, and which parameters it takes."""

    build: Callable[[Sequence[LevelSpec], Mapping[str, Any]], Neck]
    params: Mapping[str, Param]


CHANNELS = Param(256, maximum=4096, help="output width of every pyramid level")
NORM = Param("gn", kind="choice", choices=NORMS, help="norm inside the neck's added blocks")
CHECKPOINT = Param(False, kind="bool", help="1: recompute each layer in the backward pass (less memory, ~10% more time)")


def _fpn(levels: Sequence[LevelSpec], p: Mapping[str, Any]) -> Neck:
    return FPN(levels, channels=p["channels"])


def _fpn_res(levels: Sequence[LevelSpec], p: Mapping[str, Any]) -> Neck:
    return FPNRes(levels, channels=p["channels"], blocks=p["blocks"], norm=p["norm"])


def _bifpn(levels: Sequence[LevelSpec], p: Mapping[str, Any]) -> Neck:
    return BiFPN(levels, channels=p["channels"], layers=p["layers"], norm=p["norm"], checkpoint=p["checkpoint"])


def _uper_fpn(levels: Sequence[LevelSpec], p: Mapping[str, Any]) -> Neck:
    return UPerFPN(levels, channels=p["channels"], norm=p["norm"])


NECKS: dict[str, NeckDef] = {
    "fpn": NeckDef(_fpn, {"channels": CHANNELS}),
    "fpn-res": NeckDef(_fpn_res, {"channels": CHANNELS, "blocks": Param(4, maximum=32, help="residual blocks per level"), "norm": NORM}),
    "bifpn": NeckDef(
        _bifpn, {"channels": CHANNELS, "layers": Param(1, maximum=32, help="stacked BiFPN layers"), "norm": NORM, "checkpoint": CHECKPOINT}
    ),
}

UPER_FPN = NeckDef(_uper_fpn, {"channels": CHANNELS, "norm": NORM})

__all__ = ["NECKS", "UPER_FPN", "FPN", "BiFPN", "FPNRes", "Neck", "NeckDef", "UPerFPN", "pyramid_levels"]
