"""The BACKBONES table: every named backbone, what builds it and, for a SwinV2, the numbers of its configuration, from
which its levels, parameters and FLOPs follow without building it or importing torch (``fcache plan``).

The counts are those of the model ``extract.backbones`` builds: its parameters up to the last stored level, and the
FLOPs that torch's ``FlopCounterMode`` counts for one image (2 per multiply-add of every convolution and matrix
product, the continuous position bias MLP included; how the attention is computed does not change them).
``tests/extract/test_catalog.py`` checks them against the built model on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fcache.common.errors import InputError
from fcache.extract import swinv2_giant
from fcache.spec import BackboneInfo, LevelSpec, level_name

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's default normalisation
RANDOM_INIT = "random-init"
PATCH = 4  # SwinV2's patch embedding: a 4 x 4 convolution, stride 4


@dataclass(frozen=True)
class SwinV2Arch:
    """A timm ``SwinTransformerV2`` as its constructor's numbers (window: the one it is built with by default)."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window: int
    extra_norm_every: int = 0  # SwinV2-G's LayerNorm after every k-th block of a stage
    mlp_ratio: float = 4.0
    cpb_hidden: int = 512  # width of the continuous position bias MLP

    def levels(self) -> dict[str, LevelSpec]:
        """Level name -> spec of each stage's output, in stage order."""
        specs = (LevelSpec(level_name(PATCH << i), self.embed_dim << i, PATCH << i) for i in range(len(self.depths)))
        return {lv.name: lv for lv in specs}

    def windows(self, input_size: int, window: int | None) -> list[int]:
        """The window of each stage: ``window`` (or the model's), the side of a smaller map (timm's rule)."""
        w = window or self.window
        return [min(w, input_size // (PATCH << i)) for i in range(len(self.depths))]

    def parameters(self, stages: int) -> int:
        """Parameters of the first ``stages`` stages and the patch embedding (no final norm, no classifier)."""
        c = self.embed_dim
        total = 3 * PATCH * PATCH * c + c + 2 * c  # patch embedding: convolution, bias, LayerNorm
        for i in range(stages):
            if i:
                total += 4 * c * 2 * c + 2 * 2 * c  # patch merging: 4C -> 2C without bias, LayerNorm
                c *= 2
            hidden, heads = int(c * self.mlp_ratio), self.num_heads[i]
            attn = 3 * c * c + 2 * c + c * c + c + heads + 3 * self.cpb_hidden + self.cpb_hidden * heads  # qkv, q/v bias, proj, scale, cpb
            block = attn + 2 * c * hidden + hidden + c + 4 * c  # MLP and two LayerNorms
            extra = self.depths[i] // self.extra_norm_every if self.extra_norm_every else 0
            total += self.depths[i] * block + extra * 2 * c
        return total

    def flops(self, input_size: int, window: int | None, stages: int) -> int:
        """FLOPs of one ``input_size`` image through the first ``stages`` stages (maps padded to whole windows)."""
        c, side = self.embed_dim, input_size // PATCH
        total = 2 * c * side * side * 3 * PATCH * PATCH
        for i, w in enumerate(self.windows(input_size, window)[:stages]):
            if i:
                side //= 2
                total += 2 * side * side * 4 * c * 2 * c
                c *= 2
            padded = math.ceil(side / w) * w
            tokens, table = padded * padded, (2 * w - 1) ** 2
            attn = 2 * tokens * c * 4 * c + 4 * tokens * w * w * c + 2 * table * self.cpb_hidden * (2 + self.num_heads[i])
            mlp = 4 * side * side * c * int(c * self.mlp_ratio)
            total += self.depths[i] * (attn + mlp)
        return total


@dataclass(frozen=True)
class BackboneDef:
    """A named backbone: a timm model (with its pretrained tag), or a builder for a variant timm does not register.

    Attributes:
        timm_name: the timm model name and tag; for a built model, what it is (recorded in the manifest).
        build: ``(input_size, window) -> model`` when timm has no such variant.
        published: False when no weights were ever released (``--weights`` or ``--random-init`` required).
        windows: task -> window, for a model without a pretrained window; ``default_window`` for other tasks.
        arch: the SwinV2 configuration the model is built with, for its counts without building it.
        mean, std: its input normalisation (timm's pretrained configuration).
    """

    timm_name: str
    build: Callable[[int, int], torch.nn.Module] | None = None
    published: bool = True
    windows: Mapping[str, int] = field(default_factory=dict)
    default_window: int | None = None
    arch: SwinV2Arch | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


# the paper's backbones (ImageNet-22K-pretrained tags where timm has them, as the paper uses)
BACKBONES: dict[str, BackboneDef] = {
    "swinv2-t": BackboneDef("swinv2_tiny_window16_256.ms_in1k", arch=SwinV2Arch(96, (2, 2, 6, 2), (3, 6, 12, 24), 16)),
    "swinv2-s": BackboneDef("swinv2_small_window16_256.ms_in1k", arch=SwinV2Arch(96, (2, 2, 18, 2), (3, 6, 12, 24), 16)),
    "swinv2-b": BackboneDef("swinv2_base_window12_192.ms_in22k", arch=SwinV2Arch(128, (2, 2, 18, 2), (4, 8, 16, 32), 12)),
    "swinv2-l": BackboneDef("swinv2_large_window12_192.ms_in22k", arch=SwinV2Arch(192, (2, 2, 18, 2), (6, 12, 24, 48), 12)),
    "swinv2-g": BackboneDef(
        swinv2_giant.DESCRIPTION,
        build=swinv2_giant.build_swinv2_giant,
        published=False,
        windows=swinv2_giant.WINDOWS,
        default_window=swinv2_giant.DEFAULT_WINDOW,
        arch=SwinV2Arch(**swinv2_giant.CONFIG, window=swinv2_giant.DEFAULT_WINDOW, extra_norm_every=swinv2_giant.EXTRA_NORM_EVERY),
    ),
    "swinv2-g-timm": BackboneDef("swinv2_cr_giant_224", published=False),  # timm's 2.6B giant, depths (2, 2, 42, 2)
}


def resolve(model: str) -> tuple[str, str]:
    """(alias, timm name with tag) of ``model``: one of BACKBONES or any timm model name."""
    if model in BACKBONES:
        return model, BACKBONES[model].timm_name
    import timm

    if not timm.is_model(model.split(".")[0]):
        raise InputError(f"unknown model {model!r}: use one of {', '.join(BACKBONES)} or a timm model name (see timm.list_models())")
    return model, model


def default_window(model: str, task: str) -> int | None:
    """The window ``model`` is built with for ``task`` when none is asked for: the paper's for a model without a
    pretrained one (SwinV2-G: detection 32, segmentation 40, video 16), else None (the model's own)."""
    d = BACKBONES.get(model)
    if d is None or d.default_window is None:
        return None
    return d.windows.get(task, d.default_window)


def pick_levels(offered: Sequence[str], levels: Sequence[str] | None) -> list[str]:
    """The levels to store, in the model's order: ``levels``, or every one of p2-p5 the model ``offered`` (in order)."""
    wanted = list(levels) if levels else [n for n in ("p2", "p3", "p4", "p5") if n in offered]
    missing = [n for n in wanted if n not in offered]
    if missing:
        raise InputError(f"the model has no level {', '.join(missing)}; it offers {', '.join(sorted(offered))}")
    return sorted(wanted, key=list(offered).index)


@dataclass(frozen=True)
class Described:
    """What ``fcache plan`` needs of a backbone: its manifest entry, normalisation, parameters and FLOPs per image."""

    info: BackboneInfo
    mean: tuple[float, ...]
    std: tuple[float, ...]
    parameters: int
    flops: float


def described(model: str, *, input_size: int, levels: Sequence[str] | None = None, window: int | None = None) -> Described | None:
    """The backbone ``build_backbone(model, meta=True, ...)`` would give, from its BACKBONES configuration; None for a
    model without one (then build it)."""
    d = BACKBONES.get(model)
    if d is None or d.arch is None:
        return None
    if window is not None and window < 1:
        raise InputError(f"--window {window}: must be at least 1")
    specs = d.arch.levels()
    names = pick_levels(list(specs), levels)
    stages = list(specs).index(names[-1]) + 1
    first = d.arch.windows(input_size, window)[0]
    info = BackboneInfo(model, d.timm_name, RANDOM_INIT, input_size, first, tuple(specs[n] for n in names))
    return Described(info, d.mean, d.std, d.arch.parameters(stages), float(d.arch.flops(input_size, window, stages)))
