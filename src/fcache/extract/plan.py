"""``fcache plan``: how big a store will be and how long its extraction will take, before committing to it.

Shapes come from the backbone built on the meta device (no weights, no memory: works for SwinV2-G);
the compression ratio and time per image from a short real run into a temporary folder, or, with
``--no-run``, the time from the forward's FLOPs at an assumed sustained throughput.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fcache.extract.backbones import parameter_count
from fcache.extract.driver import ExtractConfig, prepare, run_extract
from fcache.store.dtypes import stored
from fcache.store.info import human


def plan(cfg: ExtractConfig, *, measure: int = 4, no_run: bool = False, assume_tflops: float = 100.0) -> dict[str, Any]:
    """Per-level sizes, totals and a time estimate for extracting ``cfg``; writes nothing outside a temp folder."""
    _, refs, backbone, manifest = prepare(cfg, meta=True)
    n, views = len(refs), manifest.num_views
    images_per_sample = views * (manifest.preprocessing.frames or 1)
    dtype = stored(cfg.dtype)
    itemsize = dtype.numpy.itemsize
    levels: list[dict[str, Any]] = []
    for lv in manifest.levels:
        shape = manifest.level_shape(lv.name)
        per_view = math.prod(shape) * itemsize + (math.prod(shape[:-2]) * 4 if dtype.scaled else 0)
        levels.append(
            {"name": lv.name, "channels": lv.channels, "stride": lv.stride, "shape": list(shape), "bytes_per_sample": per_view * views}
        )
    per_sample = sum(lv["bytes_per_sample"] for lv in levels)
    flops = forward_flops(backbone.model, cfg.input_size)
    out: dict[str, Any] = {
        "model": manifest.backbone.timm_name,
        "alias": manifest.backbone.alias,
        "backbone_params": parameter_count(backbone.model),
        "input_size": cfg.input_size,
        "window": manifest.backbone.window,
        "dtype": cfg.dtype,
        "codec": cfg.codec,
        "samples": n,
        "views": views,
        "images_per_sample": images_per_sample,
        "levels": levels,
        "bytes_per_sample": per_sample,
        "total_bytes": per_sample * n,
        "gflops_per_image": flops / 1e9,
        "estimate": "flops",
        "seconds_per_image": flops / (assume_tflops * 1e12),
        "assumed_tflops": assume_tflops,
    }
    if not no_run:
        out |= _measure(cfg, min(measure, n))
    out["compressed_total_bytes"] = out["total_bytes"] / out["compression_ratio"] if out.get("compression_ratio") else None
    out["total_seconds"] = out["seconds_per_image"] * images_per_sample * n
    return out


def forward_flops(model: torch.nn.Module, input_size: int) -> float:
    """FLOPs of one image through a backbone built on the meta device (no weights needed)."""
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        model(torch.empty(1, 3, input_size, input_size))
    return float(counter.get_total_flops())


def _measure(cfg: ExtractConfig, k: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fcache-plan-"))
    try:
        trial = dataclasses.replace(cfg, out=str(tmp / "trial.zarr"), limit=k, overwrite=True, shard_size=max(1, k))
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
    lines = [
        f"{p['model']} @ {p['input_size']}px, {p['dtype']} / {p['codec']}: {p['samples']} samples x {p['views']} views "
        f"({p['images_per_sample']} backbone images each)",
        "",
        f"{'level':6s} {'shape':>22s} {'per sample':>12s} {'total':>10s}",
    ]
    for lv in p["levels"]:
        per, total = human(lv["bytes_per_sample"]), human(lv["bytes_per_sample"] * p["samples"])
        lines.append(f"{lv['name']:6s} {str(tuple(lv['shape'])):>22s} {per:>12s} {total:>10s}")
    lines.append(f"{'total':6s} {'':>22s} {human(p['bytes_per_sample']):>12s} {human(p['total_bytes']):>10s}  (uncompressed)")
    if p.get("compression_ratio"):
        lines.append(
            f"compression ratio {p['compression_ratio']:.2f} ({p['estimate']}): about {human(p['compressed_total_bytes'])} on disk"
        )
    lines.append(f"backbone: {_count(p['backbone_params'])} parameters, {p['gflops_per_image']:.1f} GFLOPs per image, window {p['window']}")
    how = p["estimate"] if p["estimate"] != "flops" else f"from FLOPs at an assumed {p['assumed_tflops']:.0f} TFLOP/s"
    lines.append(f"time: {p['seconds_per_image'] * 1e3:.1f} ms per image ({how}), about {_duration(p['total_seconds'])} in all")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
