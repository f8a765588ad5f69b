"""``fcache plan``: how big a store will be and how long its extraction will take, before committing to it.

Shapes, parameters and FLOPs of a known backbone come from its configuration (``extract.catalog``: no torch, no
build); any other model, or one given ``--weights`` (checked), is built on the meta device (no memory: any size works).
The compression ratio and time per image from a short real run into a temporary folder, or, with
``--no-run``, the time from a throughput measured on a device class (``THROUGHPUT``) where there is one for the
model and input size, else from the forward's FLOPs at an assumed sustained throughput; the plan says which.
With an ``--out``, the plan shows that filesystem's free space against the estimate (``fcache.extract.space``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcache.common.devices import resolve_device
from fcache.extract import plan_forms, space
from fcache.extract.catalog import Described, default_window, described
from fcache.extract.config import ExtractConfig
from fcache.extract.manifests import manifest_of, selected_samples
from fcache.extract.sources import build_source
from fcache.extract.throughput import THROUGHPUT
from fcache.store.info import human

if TYPE_CHECKING:
    import torch


def plan(
    cfg: ExtractConfig, *, measure: int = 4, no_run: bool = False, assume_tflops: float = 100.0, device_class: str = "h100",
    codecs: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Per-level sizes, totals and a time estimate for extracting ``cfg``; writes nothing outside a temp folder.

    With ``codecs`` (or ``--max-error``), every stored form measured per level (``fcache.extract.plan_forms``); the
    sizes are those of ``--dtype``, or of the forms ``--max-error`` picks.

    The flags and the dataset's metadata are checked before torch is imported, if it is at all (``--no-run`` of a
    catalogued backbone never does): parsing a COCO-train json peaks at its text plus its objects, and that peak then
    does not sit on top of torch's memory. The device is checked only for the short run.
    """
    dataclasses.replace(cfg, device="cpu").validate()
    source = build_source(cfg.source)
    refs = selected_samples(cfg, source)
    if not no_run:  # the short run uses the device; a plan alone does not (plan for another machine)
        resolve_device(cfg.device)
    window = cfg.window or default_window(cfg.model, source.task)
    bb = None if cfg.weights else described(cfg.model, input_size=cfg.input_size, levels=cfg.levels, window=window)
    bb = bb or _built(cfg, window)
    manifest = manifest_of(cfg, source, refs, bb.info, bb.mean, bb.std)
    n, views = len(refs), manifest.num_views
    forms = plan_forms.measure_forms(cfg, min(measure, n), n) if not no_run and (codecs or cfg.max_error is not None) else None
    manifest = plan_forms.with_picks(manifest, forms, cfg.max_error)
    images_per_sample = views * (manifest.preprocessing.frames or 1)
    per_level = space.level_bytes(manifest)
    levels = [
        {"name": lv.name, "channels": lv.channels, "stride": lv.stride, "shape": list(manifest.level_shape(lv.name)),
         "bytes_per_sample": per_level[lv.name]}
        for lv in manifest.levels
    ]  # fmt: skip
    per_sample = sum(per_level.values())
    measured = THROUGHPUT.get((device_class, cfg.model, cfg.input_size))
    out: dict[str, Any] = {
        "model": manifest.backbone.timm_name,
        "alias": manifest.backbone.alias,
        "backbone_params": bb.parameters,
        "input_size": cfg.input_size,
        "window": manifest.backbone.window,
        "dtype": cfg.dtype,
        "forms": {lv.name: manifest.storage.form(lv.name) for lv in manifest.levels},
        "max_error": cfg.max_error,
        "codec": cfg.codec,
        "samples": n,
        "views": views,
        "images_per_sample": images_per_sample,
        "levels": levels,
        "bytes_per_sample": per_sample,
        "total_bytes": per_sample * n,
        "gflops_per_image": bb.flops / 1e9,
        "device_class": device_class,
        "estimate": "flops",
        "seconds_per_image": bb.flops / (assume_tflops * 1e12),
        "assumed_tflops": assume_tflops,
    }
    if measured is not None:
        out |= {
            "estimate": "throughput table",
            "seconds_per_image": 1 / measured.pipeline_img_s,
            "throughput": dataclasses.asdict(measured),
        }
    if forms is not None:
        out |= plan_forms.measured(manifest, forms)
    elif not no_run:
        out |= _measure(cfg, min(measure, n))
    if codecs:
        out["forms_table"] = plan_forms.table(manifest, forms["forms"] if forms else None, plan_forms.budgets(cfg.max_error))
    ratio = out.get("compression_ratio")
    out["compressed_total_bytes"] = out["total_bytes"] / ratio if ratio else None
    out["total_seconds"] = out["seconds_per_image"] * images_per_sample * n
    out["alternatives"] = space.alternatives(manifest, n, ratio)
    if cfg.out:  # what `fcache extract --out` will check
        need = space.needed(cfg.out, manifest)
        out |= {"out": cfg.out, "free_bytes": space.free_bytes(cfg.out), "needed_bytes": need.bytes, "needed": need.describe()}
    return out


def _built(cfg: ExtractConfig, window: int | None) -> Described:
    """The backbone built on the meta device and counted: a model the catalog does not describe, or ``--weights`` (the
    checkpoint is checked against the model as extract will)."""
    from fcache.extract.backbones import build_backbone, parameter_count

    backbone = build_backbone(
        cfg.model, input_size=cfg.input_size, levels=cfg.levels, weights=cfg.weights or None, random_init=cfg.random_init, meta=True,
        window=window,
    )  # fmt: skip
    flops = forward_flops(backbone.model, cfg.input_size)
    return Described(backbone.info, backbone.mean, backbone.std, parameter_count(backbone.model), flops)


def forward_flops(model: torch.nn.Module, input_size: int) -> float:
    """FLOPs of one image through a backbone built on the meta device (no weights needed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        model(torch.empty(1, 3, input_size, input_size))
    return float(counter.get_total_flops())


def _measure(cfg: ExtractConfig, k: int) -> dict[str, Any]:
    from fcache.extract.driver import run_extract

    tmp = Path(tempfile.mkdtemp(prefix="fcache-plan-"))
    try:
        trial = dataclasses.replace(cfg, out=str(tmp / "trial.zarr"), limit=k, overwrite=True, shard_size=max(1, k), no_space_check=True)
        s = run_extract(trial)
        return {
            "estimate": f"measured on {k} samples",
            "seconds_per_image": 1.0 / s.images_per_s if s.images_per_s else None,
            "compression_ratio": s.compression_ratio,
            "measured_levels": {lv["name"]: lv["compression_ratio"] for lv in s.levels},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_plan(p: dict[str, Any]) -> str:
    stored = p["dtype"] if p["max_error"] is None else ", ".join(f"{lv} {f}" for lv, f in p["forms"].items())
    lines = [
        f"{p['model']} @ {p['input_size']}px, {stored} / {p['codec']}: {p['samples']} samples x {p['views']} views "
        f"({p['images_per_sample']} backbone images each)",
        "",
        f"{'level':6s} {'shape':>22s} {'per sample':>12s} {'total':>10s}",
    ]
    for lv in p["levels"]:
        per, total = human(lv["bytes_per_sample"]), human(lv["bytes_per_sample"] * p["samples"])
        lines.append(f"{lv['name']:6s} {str(tuple(lv['shape'])):>22s} {per:>12s} {total:>10s}")
    lines.append(f"{'total':6s} {'':>22s} {human(p['bytes_per_sample']):>12s} {human(p['total_bytes']):>10s}  (uncompressed)")
    whole = (
        f"whole dataset: {p['samples']} samples x {p['views']} views x {len(p['levels'])} levels = {human(p['total_bytes'])} uncompressed"
    )
    if p.get("compression_ratio"):
        whole += f", about {human(p['compressed_total_bytes'])} on disk (compression ratio {p['compression_ratio']:.2f}, {p['estimate']})"
    else:
        whole += " (compression not measured: with --no-run the raw size is the estimate)"
    lines += ["", whole]
    if p["alternatives"]:
        lines.append("smaller: " + ", ".join(f"{flag} {human(b)}" for flag, b in p["alternatives"].items()))
    if p["max_error"] is None:
        lines.append(
            f"or a budget: --max-error {plan_forms.ADVISED_MAX_ERROR:g} stores each level in its smallest form within that "
            "relative RMSE, measured on your features (--codecs shows every form's bits and error here)"
        )
    if "out" in p:
        lines.append(_space_line(p))
    if "forms_table" in p:
        lines += plan_forms.format_forms(p) + [""]
    lines.append(f"backbone: {_count(p['backbone_params'])} parameters, {p['gflops_per_image']:.1f} GFLOPs per image, window {p['window']}")
    lines.append(f"time: {p['seconds_per_image'] * 1e3:.1f} ms per image ({_how(p)}), about {_duration(p['total_seconds'])} in all")
    return "\n".join(lines)


def _how(p: dict[str, Any]) -> str:
    """Which assumption the time estimate rests on."""
    if p["estimate"] == "flops":
        return (
            f"from FLOPs at an assumed {p['assumed_tflops']:g} TFLOP/s sustained: no throughput measured for "
            f"{p['alias']} @ {p['input_size']} on {p['device_class']}; measured ones: {', '.join(_measured())}"
        )
    if p["estimate"] == "throughput table":
        t = p["throughput"]
        return f"measured: {t['pipeline_img_s']:g} images/s extracting ({t['forward_img_s']:g} bare forward) on {t['setting']}"
    return p["estimate"]


def _measured() -> list[str]:
    return [f"{model}@{size} on {device}" for device, model, size in THROUGHPUT]


def _space_line(p: dict[str, Any]) -> str:
    if p["free_bytes"] is None:
        return f"free space at {p['out']}: not checked (object storage)"
    verdict = "enough" if p["needed_bytes"] <= p["free_bytes"] else "NOT enough: `fcache extract` will refuse to start"
    return f"free space at {p['out']}: {human(p['free_bytes'])}; extract needs {p['needed']}: {verdict}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
