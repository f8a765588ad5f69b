"""``fcache info``: what a store holds, how big it is on disk (or in the bucket), and how well it compressed.

Sizes come from the ledger (each committed unit's record holds the size of every object it wrote) and the few
store-wide objects (arrays' metadata, a projected form's basis) asked for by key: no listing, on any backend.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from zarr.core.common import ZARR_JSON  # every node's metadata

from fcache.store import layout
from fcache.store.backends import Backend
from fcache.store.dtypes import stored


def describe(path: str | Path | Backend, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Manifest, per-level forms, shapes and sizes, status counts and quantisation error, as plain data.

    Per level: ``form``; ``disk_bytes`` (values, scales and side data); ``bits_per_value``, those bytes over the values
    of the committed samples; ``quantisation_error``, the relative RMSE measured while writing; ``chosen``, what the
    ``--max-error`` choice measured on the first unit (``rel_rmse``, ``bits``), or None. ``units_bytes``: every object
    the committed units wrote (features, scales, samples, targets), as their ledger records say."""
    from fcache.store.reader import FeatureStore  # here: ``human`` is imported by light modules (no torch)

    store = FeatureStore(path, storage_options=storage_options)
    m = store.manifest
    committed = sum(rec.samples for rec in store.ledger.values())
    levels = [_level(store, lv.name, committed, _level_bytes(store, lv.name)) for lv in store.levels]
    disk_total = sum(lv["disk_bytes"] for lv in levels)
    raw_total = sum(lv["raw_bytes"] for lv in levels)
    values_total = sum(8 * lv["disk_bytes"] / lv["bits_per_value"] for lv in levels if lv["bits_per_value"])
    return {
        "store": str(store.root),
        "manifest": store.attrs,
        "samples": m.dataset.n,
        "views": store.num_views,
        "units_committed": len(store.ledger),
        "units_total": len(store.units),
        "status_counts": store.status_counts(),
        "levels": levels,
        "disk_bytes": disk_total,
        "units_bytes": sum(rec.bytes for rec in store.ledger.values()),
        "compression_ratio": raw_total / disk_total if disk_total else 0.0,
        "bits_per_value": 8 * disk_total / values_total if values_total else 0.0,
        "max_error": m.storage.max_error,
        "targets": list(store.target_names),
    }


def _level_bytes(store: Any, level: str) -> int:
    """Bytes of a level's arrays (values, scales, basis): the committed units' objects as the ledger recorded them,
    the arrays' metadata and the basis by key."""
    d = stored(store.manifest.storage.form(level))
    arrays = [f"{layout.FEATURES}/{level}", *([f"{layout.SCALES}/{level}"] if d.scaled else [])]
    prefixes = tuple(a + "/" for a in arrays)
    units = sum(f.size for rec in store.ledger.values() for key, f in rec.files.items() if key.startswith(prefixes))
    keys = [f"{a}/{ZARR_JSON}" for a in arrays]
    if d.fitted:
        basis = zarr.open_array(store.backend.zarr_store(), path=f"{layout.BASIS}/{level}", mode="r", zarr_format=3)
        chunks = itertools.product(*map(range, basis.cdata_shape))
        keys += [f"{layout.BASIS}/{level}/{ZARR_JSON}", *(f"{layout.BASIS}/{level}/{basis.metadata.encode_chunk_key(c)}" for c in chunks)]
    return units + sum(size or 0 for size in store.backend.sizes(keys))


def _level(store: Any, level: str, committed: int, disk: int) -> dict[str, Any]:
    """One level's row of ``describe``: its form, ``disk`` bytes (values, scales, basis), bits per value and errors."""
    m = store.manifest
    lv, form = m.level(level), m.storage.form(level)
    d, shape = stored(form), m.level_shape(level)
    values = committed * store.num_views * math.prod(shape)
    side = math.prod(d.side_shape(shape)) * d.side.itemsize if d.side is not None else 0
    raw = committed * store.num_views * (math.prod(d.stored_shape(shape)) * d.numpy.itemsize + side)
    return {
        "name": level,
        "channels": lv.channels,
        "stride": lv.stride,
        "shape": [m.dataset.n, store.num_views, *shape],
        "form": form,
        "dtype": form,
        "disk_bytes": disk,
        "raw_bytes": raw,
        "bytes_per_sample": disk / committed if committed else 0.0,
        "bits_per_value": 8 * disk / values if values else 0.0,
        "compression_ratio": raw / disk if disk else 0.0,
        "quantisation_error": store.quantisation_error.get(level),
        "chosen": m.storage.measured.get(level),
    }


def format_info(d: dict[str, Any]) -> str:
    m = d["manifest"]
    bb, st, ds = m["backbone"], m["storage"], m["dataset"]
    src = ds.get("source", ds)  # stores written before the source was recorded keep kind/split in dataset
    lines = [
        f"store      {d['store']}  (format {m['format_version']}, fcache {m.get('fcache_version', '?')})",
        f"backbone   {bb['alias']} ({bb['timm_name']}) @ {bb['input_size']}px, weights {bb['weights'][:16]}",
        f"dataset    {src['kind']} {src.get('split', '')}  {d['samples']} samples x {d['views']} views",
        f"targets    {', '.join(d['targets']) or '-'}",
        f"storage    {forms_text(st, [lv['name'] for lv in d['levels']])}, codec {st['codec']}, shards of {st['shard_size']} samples",
        f"units      {d['units_committed']}/{d['units_total']} committed",
        "status     " + ", ".join(f"{k} {v}" for k, v in sorted(d["status_counts"].items())),
        "",
        f"{'level':6s} {'C':>5s} {'stride':>6s} {'shape':>24s} {'form':>7s} {'on disk':>10s} {'per sample':>11s} {'bits':>6s} "
        f"{'ratio':>6s} {'rel.RMSE':>9s}",
    ]
    for lv in d["levels"]:
        err = lv["quantisation_error"]
        lines.append(
            f"{lv['name']:6s} {lv['channels']:5d} {lv['stride']:6d} {str(tuple(lv['shape'])):>24s} {lv.get('form', st['dtype']):>7s} "
            f"{human(lv['disk_bytes']):>10s} {human(lv['bytes_per_sample']):>11s} {lv.get('bits_per_value', 0):6.2f} "
            f"{lv['compression_ratio']:6.2f} {'-' if err is None else f'{err:.2e}':>9s}"
        )
    lines.append(
        f"{'total':6s} {'':>5s} {'':>6s} {'':>24s} {'':>7s} {human(d['disk_bytes']):>10s} {'':>11s} {d.get('bits_per_value', 0):6.2f} "
        f"{d['compression_ratio']:6.2f}"
    )
    lines += ["  bits: per stored value on disk, scales and side data included; rel.RMSE: measured while writing"]
    return "\n".join(lines)


def forms_text(st: Mapping[str, Any], levels: list[str]) -> str:
    """``fp16``, or the form of each level and the budget they were chosen for."""
    forms, budget = st.get("forms") or {}, st.get("max_error")
    if not forms and budget is None:
        return str(st["dtype"])
    shown = ", ".join(f"{lv} {forms.get(lv, st['dtype'])}" for lv in levels)
    return shown + (f" (chosen for --max-error {budget:g})" if budget is not None else "")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
