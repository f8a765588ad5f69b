"""The frozen base network B(.) of the paper: timm SwinV2 aliases, weights, and an NCHW feature forward.

Level specs come from the model's own ``feature_info`` (channels, reduction), never from a table.
Larger input, same window (paper §3.3): ``input_size`` is set at model creation, the window stays.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models._features import FeatureListNet

from fcache.common.devices import resolve_device
from fcache.common.errors import InputError
from fcache.spec import BackboneInfo, LevelSpec, level_name
from fcache.store.layout import sha256_file

# alias -> timm model (ImageNet-22K-pretrained tags where timm has them, as the paper uses)
ALIASES = {
    "swinv2-t": "swinv2_tiny_window16_256.ms_in1k",
    "swinv2-s": "swinv2_small_window16_256.ms_in1k",
    "swinv2-b": "swinv2_base_window12_192.ms_in22k",
    "swinv2-l": "swinv2_large_window12_192.ms_in22k",
    "swinv2-g": "swinv2_cr_giant_224",  # ~2.6B parameters; weights never published
}
UNPUBLISHED = {"swinv2-g"}
RANDOM_INIT = "random-init"


@dataclass
class Backbone:
    """A frozen feature extractor: ``forward`` maps (B, 3, S, S) images to {level: (B, C, H, W)}."""

    model: torch.nn.Module
    info: BackboneInfo
    nhwc: bool  # the model returns NHWC maps (timm SwinV2); converted to NCHW in forward
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features: inference mode, bf16 autocast on CUDA, float32 out."""
        device = next(self.model.parameters()).device
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with amp:
            return {k: v.float() for k, v in self.features(images.to(device, non_blocking=True)).items()}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The plain forward (gradients flow when enabled: the full-finetune comparison of ``fcache bench``)."""
        outs = self.model(images)
        nchw = (f.permute(0, 3, 1, 2) if self.nhwc else f for f in outs)  # (B, C, H, W), contiguous as the store holds it
        return {lv.name: f.contiguous() for lv, f in zip(self.info.levels, nchw, strict=True)}


def resolve(model: str) -> tuple[str, str]:
    """(alias, timm name with tag) of ``model``: one of ALIASES or any timm model name."""
    if model in ALIASES:
        return model, ALIASES[model]
    base = model.split(".")[0]
    if not timm.is_model(base):
        raise InputError(f"unknown model {model!r}: use one of {', '.join(ALIASES)} or a timm model name (see timm.list_models())")
    return model, model


def build_backbone(
    model: str,
    *,
    input_size: int,
    levels: Sequence[str] | None = None,
    weights: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str = "cpu",
    meta: bool = False,
) -> Backbone:
    """Create the frozen backbone in eval mode.

    Args:
        weights: a safetensors or torch checkpoint of the full timm model (keys checked strictly).
        random_init: random weights (tests, demo), seeded by ``seed``; never implied.
        meta: build on the meta device (shapes and level specs only, no memory: ``fcache plan``).
    """
    alias, timm_name = resolve(model)
    if weights and random_init:
        raise InputError("--weights and --random-init exclude each other; give one")
    if alias in UNPUBLISHED and not (weights or random_init or meta):
        raise InputError(f"{alias} weights were never published: pass --weights FILE with your checkpoint, or --random-init")
    pretrained = not (weights or random_init or meta)
    torch.manual_seed(seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        full = _create(timm_name, input_size, pretrained)
    weights_id = RANDOM_INIT if random_init or meta else f"timm:{timm_name}"
    if weights:
        weights_id = load_weights(full, weights)
    nhwc = getattr(full, "output_fmt", "NCHW") == "NHWC"
    cfg: dict[str, Any] = dict(getattr(full, "pretrained_cfg", {}) or {})
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    wrapped, specs = _features(full, levels)
    window = _window(full)
    if not meta:
        wrapped = wrapped.to(resolve_device(device)).eval().requires_grad_(False)
    info = BackboneInfo(alias, timm_name, weights_id, input_size, window, specs)
    return Backbone(wrapped, info, nhwc, tuple(mean), tuple(std))


def _create(timm_name: str, input_size: int, pretrained: bool) -> torch.nn.Module:
    """The timm model at ``input_size``. SwinV2 gets ``strict_img_size=False``: maps that the (pretrained) window
    does not divide are padded per block (timm's dynamic mask), so any multiple of 32 works with any window."""
    attempts: tuple[dict[str, Any], ...] = ({"img_size": input_size, "strict_img_size": False}, {"img_size": input_size}, {})
    try:
        for kwargs in attempts:
            try:
                return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
            except TypeError:  # the model has no such argument (convnets have no img_size)
                continue
        raise InputError(f"timm cannot create {timm_name}")
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise InputError(
            f"could not load timm's pretrained weights for {timm_name} ({type(e).__name__}: {e}); "
            "without network access pass --weights FILE, or --random-init for a random backbone"
        ) from e


def _features(full: torch.nn.Module, levels: Sequence[str] | None) -> tuple[FeatureListNet, tuple[LevelSpec, ...]]:
    """Wrap the model to return the wanted levels; their specs from its feature_info."""
    info: list[dict[str, Any]] = list(cast(Any, full).feature_info)  # dicts: num_chs, reduction, module
    by_name = {level_name(int(d["reduction"])): k for k, d in enumerate(info) if int(d["reduction"]) in (4, 8, 16, 32, 64)}
    wanted = list(levels) if levels else [n for n in ("p2", "p3", "p4", "p5") if n in by_name]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise InputError(f"the model has no level {', '.join(missing)}; it offers {', '.join(sorted(by_name))}")
    order = sorted(wanted, key=lambda n: by_name[n])
    indices = tuple(by_name[n] for n in order)
    specs = tuple(LevelSpec(n, int(info[by_name[n]]["num_chs"]), int(info[by_name[n]]["reduction"])) for n in order)
    try:  # timm builds SwinV2's features with flattened stages, convnets' without: take whichever fits
        return FeatureListNet(full, out_indices=indices, flatten_sequential=True), specs
    except AssertionError:
        return FeatureListNet(full, out_indices=indices, flatten_sequential=False), specs


def _window(model: torch.nn.Module) -> int | None:
    for m in model.modules():
        ws = getattr(m, "window_size", None)
        if ws is not None:
            return int(ws[0] if isinstance(ws, (tuple, list)) else ws)
    return None


def load_weights(model: torch.nn.Module, path: str) -> str:
    """Load a checkpoint strictly into ``model``; returns the file's sha256.

    Raises:
        ValueError: missing or unexpected keys (listed), or mismatched shapes.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    state = _read_checkpoint(p)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        ]
        raise InputError(f"weights {p} do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return sha256_file(p)


def _read_checkpoint(p: Path) -> dict[str, torch.Tensor]:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # a bad header or a cut file
            raise InputError(f"--weights {p} is not readable safetensors ({type(e).__name__}: {str(e)[:80]})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it refuses anyway
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)  # never full unpickling
    except Exception as e:  # torch's own message would advise unsafe loading: name the problem only
        raise InputError(
            f"--weights {p} is not a safetensors file or a torch checkpoint of tensors only ({type(e).__name__}); "
            "give the model's weights (fcache never unpickles arbitrary objects)"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{p} holds no state dict of tensors")
    return obj


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def iter_levels(names: str) -> Iterator[str]:
    """Parse ``p2,p3,p4,p5`` into level names, validated."""
    for n in (x.strip() for x in names.split(",") if x.strip()):
        if n not in ("p2", "p3", "p4", "p5", "p6"):
            raise InputError(f"unknown level {n!r}; levels are p2, p3, p4, p5 (strides 4 to 32)")
        yield n
