"""The frozen base network B(.) of the paper: the backbones of ``extract.catalog``'s BACKBONES table (timm SwinV2
and the paper's SwinV2-G) or any timm model built, weights in timm's or the official Swin layout, an NCHW feature forward.

Level specs come from the model's own ``feature_info`` (channels, reduction), never from a table.
Larger input, same window (paper §3.3): ``input_size`` is set at model creation, the window stays as pretrained
unless ``window`` says otherwise. The classifier (``head.*``) is never used for features: a checkpoint need not hold it.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models._features import FeatureListNet

from fcache.common.devices import resolve_device
from fcache.common.errors import InputError
from fcache.common.rng import rng_scope
from fcache.extract.attention import set_attention
from fcache.extract.catalog import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, default_window, pick_levels, resolve
from fcache.extract.config import check_attention
from fcache.spec import BackboneInfo, LevelSpec, level_name
from fcache.store.layout import sha256_file

SIMMIM_ONLY = ("mask_token",)  # SimMIM's pretraining-only parameter of the encoder
__all__ = ["BACKBONES", "RANDOM_INIT", "Backbone", "build_backbone", "default_window", "resolve"]  # the table's names re-exported


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
    window: int | None = None,
    attention: str = "sdpa",
) -> Backbone:
    """Create the frozen backbone in eval mode.

    Args:
        weights: a safetensors or torch checkpoint, timm's layout or the official Swin one (keys checked strictly).
        random_init: random weights (tests, demo), seeded by ``seed``; never implied.
        meta: build on the meta device (shapes and level specs only, no memory: ``fcache plan``).
        window: attention window; None keeps the model's own (for SwinV2-G: ``default_window(model, "")``).
        attention: how SwinV2 window attention is computed (``extract.attention``): ``sdpa`` or ``timm``'s own.
    """
    alias, timm_name = resolve(model)
    if weights and random_init:
        raise InputError("--weights and --random-init exclude each other; give one")
    d = BACKBONES.get(alias)
    if d is not None and not d.published and not (weights or random_init or meta):
        raise InputError(f"{alias} weights were never published: pass --weights FILE with your checkpoint, or --random-init")
    if window is not None and window < 1:
        raise InputError(f"--window {window}: must be at least 1")
    check_attention(attention)
    pretrained = not (weights or random_init or meta)
    with rng_scope(seed=seed, cuda=False), torch.device("meta") if meta else contextlib.nullcontext():  # random init from seed
        if d is not None and d.build is not None:
            full = d.build(input_size, window or default_window(alias, "") or 0)
        else:
            full = _create(timm_name, input_size, pretrained)
            if window is not None:
                _set_window(full, window, timm_name)
    weights_id = RANDOM_INIT if random_init or meta else f"timm:{timm_name}"
    if weights:
        weights_id = load_weights(full, weights)
    set_attention(full, attention)
    nhwc = getattr(full, "output_fmt", "NCHW") == "NHWC"
    cfg: dict[str, Any] = dict(getattr(full, "pretrained_cfg", {}) or {})
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    wrapped, specs = _features(full, levels)
    if not meta:
        wrapped = wrapped.to(resolve_device(device)).eval().requires_grad_(False)
    info = BackboneInfo(alias, timm_name, weights_id, input_size, _window(full), specs)
    return Backbone(wrapped, info, nhwc, tuple(mean), tuple(std))


def _create(timm_name: str, input_size: int, pretrained: bool) -> torch.nn.Module:
    """The timm model at ``input_size``. SwinV2 gets ``strict_img_size=False``: maps that the
    (pretrained) window does not divide are padded per block (timm's dynamic mask), so any multiple of 32 works."""
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


def _set_window(model: torch.nn.Module, window: int, timm_name: str) -> None:
    """Rebuild the attention windows (timm's ``set_input_size``); nothing changes when the model already has ``window``."""
    if _window(model) == window:
        return
    try:
        cast(Any, model).set_input_size(window_size=window)
    except (AttributeError, TypeError):
        raise InputError(f"--window {window}: {timm_name} has no attention window to set; leave --window out") from None


def _features(full: torch.nn.Module, levels: Sequence[str] | None) -> tuple[FeatureListNet, tuple[LevelSpec, ...]]:
    """Wrap the model to return the wanted levels; their specs from its feature_info."""
    info: list[dict[str, Any]] = list(cast(Any, full).feature_info)  # dicts: num_chs, reduction, module
    by_name = {level_name(int(d["reduction"])): k for k, d in enumerate(info) if int(d["reduction"]) in (4, 8, 16, 32, 64)}
    order = pick_levels(sorted(by_name, key=by_name.__getitem__), levels)
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
    """Load a checkpoint strictly into the full ``model`` (before it is wrapped for features); returns the file's sha256.

    Accepted: timm's layout, and the official Swin layout (``{"model": state_dict}``, downsample at the end of each
    stage, persistent index/coords/mask buffers; SimMIM's ``encoder.`` prefix too), converted by timm's own
    ``checkpoint_filter_fn`` of the model's module. The classifier is not checked: the checkpoint's ``head.*`` keys
    are left out and the model keeps its own (features never use it); every other key must match.

    Raises:
        InputError: neither layout fits; lists the missing, unexpected and mismatched keys of the closer one.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file {p} does not exist; give the path of a safetensors or torch checkpoint")
    own = model.state_dict()
    head = {k: v for k, v in own.items() if k.startswith("head.")}
    tried = []
    for layout, state in _layouts(_read_checkpoint(p), model):
        state = {k: v for k, v in state.items() if not k.startswith("head.")} | head
        problems = _key_problems(own, state)
        if not problems:
            model.load_state_dict(state, strict=True)
            return sha256_file(p)
        tried.append((sum(len(keys) for _, keys in problems), layout, problems))
    _, layout, problems = min(tried, key=lambda t: t[0])
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for label, keys in problems]
    raise InputError(f"weights {p} do not fit {type(model).__name__} ({layout}): " + "; ".join(parts))


def _layouts(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The checkpoint as saved, then as converted by timm's ``checkpoint_filter_fn`` of the model's module, if any."""
    if any(k.startswith("encoder.") for k in state) and not any(k.startswith("encoder.") for k in model.state_dict()):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.") and k[len("encoder.") :] not in SIMMIM_ONLY}
    out = [("timm layout", state)]
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        with contextlib.suppress(Exception):  # a checkpoint the converter cannot read is judged as saved
            out.append(("converted by timm's checkpoint_filter_fn", convert(dict(state), model)))
    return out


def _key_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape
    ]
    problems = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
    return [(label, keys) for label, keys in problems if keys]


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
    """Parameters of ``model``; of a ``Backbone.model``, those that compute the stored levels (no classifier)."""
    return sum(p.numel() for p in model.parameters())


def iter_levels(names: str) -> Iterator[str]:
    """Parse ``p2,p3,p4,p5`` into level names, validated."""
    for n in (x.strip() for x in names.split(",") if x.strip()):
        if n not in ("p2", "p3", "p4", "p5", "p6"):
            raise InputError(f"unknown level {n!r}; levels are p2, p3, p4, p5 (strides 4 to 32)")
        yield n
