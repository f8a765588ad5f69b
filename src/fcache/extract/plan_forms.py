"""``fcache plan --codecs``: every stored form of every level, measured on the plan's measuring run, as a table.

The measuring run extracts its samples in fp32 into a temporary store; each level's features (evenly spaced maps, at
most ``MEASURE_VALUES`` values) are then measured in every form (``fcache.store.forms.measure_all``): bits per stored
value after the codec (side data included), the size of the whole dataset in that form, the relative RMSE, encode
and decode MB/s (of float32 features, on this machine's CPU), and the budgets of ``--max-error`` that pick the form.
With ``--no-run`` the table holds each form's raw size (before the codec) and nothing measured.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcache.extract import space
from fcache.extract.config import ExtractConfig
from fcache.spec import Manifest
from fcache.store.dtypes import DTYPES
from fcache.store.forms import FormMeasure, measure_all, pick, storage_of
from fcache.store.info import human

ADVISED_MAX_ERROR = 0.1  # the budget plan advises: on benchmarks/compact.py's sets, the one that met the goal on every set
# that can resolve it (1.35-1.75 bits per value, box AP50 -0.004, mIoU unchanged)
BUDGETS = (0.01, 0.05, 0.1, 0.25, 0.5)  # the --max-error values the table says it picks for (and the user's own)


def measure_forms(cfg: ExtractConfig, k: int, n: int) -> dict[str, Any]:
    """A measuring run of ``k`` samples in fp32; every form measured on each level's features (a projected form's
    basis counted over the ``n`` samples of the whole dataset)."""
    from fcache.extract.driver import run_extract
    from fcache.store.forms import MEASURE_VALUES
    from fcache.store.reader import FeatureStore

    tmp = Path(tempfile.mkdtemp(prefix="fcache-plan-"))
    try:
        trial = dataclasses.replace(cfg, out=str(tmp / "trial.zarr"), limit=k, overwrite=True, shard_size=max(1, k), no_space_check=True,
                                    dtype="fp32", max_error=None)  # fmt: skip
        s = run_extract(trial)
        store = FeatureStore(trial.out)
        forms = {}
        for lv in store.level_names:
            maps = np.concatenate([store.read(lv, int(i)).reshape(-1, *store.manifest.level_shape(lv)[-3:]) for i in store.ok_indices])
            step = max(1, math.ceil(maps.size / MEASURE_VALUES))
            values = store.manifest.num_views * math.prod(store.manifest.level_shape(lv)) * n
            forms[lv] = measure_all(maps[::step], cfg.codec, store_values=values)
        return {"estimate": f"measured on {k} samples", "seconds_per_image": 1.0 / s.images_per_s if s.images_per_s else None,
                "forms": forms}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_picks(m: Manifest, forms: Mapping[str, Any] | None, max_error: float | None) -> Manifest:
    """``m`` with each level in the form ``max_error`` picks among the measured ``forms`` (as it is without either)."""
    if forms is None or max_error is None:
        return m
    chosen = {lv: pick(ms, max_error).choice() for lv, ms in forms["forms"].items()}
    return dataclasses.replace(m, storage=storage_of(chosen, m.storage, max_error))


def measured(m: Manifest, forms: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's measured figures: how, the time per image, and the compression ratio of ``m``'s forms."""
    levels = [lv.name for lv in m.levels]
    bits = {lv: next(x.bits for x in forms["forms"][lv] if x.form == m.storage.form(lv)) for lv in levels}
    disk = sum(bits[lv] * values_per_sample(m, lv) / 8 for lv in levels)
    raw = sum(space.level_bytes(m).values())
    return {"estimate": forms["estimate"], "seconds_per_image": forms["seconds_per_image"], "compression_ratio": raw / disk}


def budgets(max_error: float | None) -> list[float]:
    """The budgets the table says it picks for: the usual ones and the user's."""
    return sorted({*BUDGETS, *([max_error] if max_error is not None else [])})


def values_per_sample(m: Manifest, level: str) -> int:
    return m.num_views * math.prod(m.level_shape(level))


def picks(measures: Sequence[FormMeasure], budgets: Sequence[float]) -> dict[float, str]:
    return {b: pick(measures, b).form for b in budgets}


def table(m: Manifest, measured: Mapping[str, Sequence[FormMeasure]] | None, budgets: Sequence[float]) -> dict[str, list[dict]]:
    """Level -> a row per form: bits per value, total bytes for the whole dataset, and (measured) error, speeds, picks."""
    out: dict[str, list[dict]] = {}
    for lv in m.levels:
        values = values_per_sample(m, lv.name) * m.dataset.n
        rows: list[dict[str, Any]]
        if measured is None:
            rows = [{"form": f, "bits": raw_bits(m, lv.name, f), "measured": False} for f in DTYPES]
        else:
            chosen = picks(measured[lv.name], budgets)
            rows = [dataclasses.asdict(x) | {"measured": True, "picked_for": [b for b, f in chosen.items() if f == x.form]}
                    for x in measured[lv.name]]  # fmt: skip
        out[lv.name] = [r | {"total_bytes": r["bits"] * values / 8} for r in sorted(rows, key=lambda r: r["bits"])]
    return out


def raw_bits(m: Manifest, level: str, form: str) -> float:
    """Bits per value of ``form`` before the codec: the stored element over the values it packs, and the side data."""
    d, shape = DTYPES[form], m.level_shape(level)
    side = math.prod(d.side_shape(shape)) * d.side.itemsize * 8 if d.side is not None else 0
    return (math.prod(d.stored_shape(shape)) * d.numpy.itemsize * 8 + side) / math.prod(shape)


def format_forms(p: Mapping[str, Any]) -> list[str]:
    """The --codecs table of a plan, per level."""
    forms = p["forms_table"]
    rows = next(iter(forms.values()))
    measured = bool(rows) and rows[0]["measured"]
    head = f"stored forms ({p['estimate'] + ', codec ' + p['codec'] if measured else 'raw sizes, before the codec'}):"
    lines = ["", head, f"{'level':6s} {'form':7s} {'bits':>6s} {'whole dataset':>14s}"]
    if measured:
        lines[-1] += f" {'rel.RMSE':>9s} {'encode MB/s':>12s} {'decode MB/s':>12s}  --max-error picks it for"
    for lv, rows in forms.items():
        for r in rows:
            line = f"{lv:6s} {r['form']:7s} {r['bits']:6.2f} {human(r['total_bytes']):>14s}"
            if measured:
                picked = ", ".join(f"{b:g}" for b in r["picked_for"])
                line += f" {r['rel_rmse']:9.4f} {r['encode_mb_s']:12.1f} {r['decode_mb_s']:12.1f}  {picked}"
            lines.append(line)
    return lines
