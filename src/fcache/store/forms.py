"""Choosing the stored form of each level from an error budget (``--max-error``), and measuring every form.

``measure`` encodes sample features in a form, compresses them as a store would (``fcache.store.codecs``) and
decodes them back: bits per stored value after the codec (side data, CRCs and shard indexes included), the relative
RMSE of what a reader gets, and the speed of each way. A projected form is fitted on every other map and measured on
the others (its error as on samples it was not fitted on). ``choose_forms`` picks per level the smallest form within
the budget (``extract --max-error`` on the first unit's features, ``fcache plan --codecs`` on its measuring run's);
a projected form chosen comes with its basis fitted on all the samples, for the store (``fstore.create(bases=...)``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcache.common.errors import Fp16OverflowError, InputError
from fcache.store.codecs import CHUNK_OVERHEAD, blosc_of, side_bytes
from fcache.store.dtypes import DTYPES, decode, encode, stored

CANDIDATES = tuple(DTYPES)  # every form is a candidate; fp32 (exact) is always within budget
MEASURE_VALUES = 1 << 24  # values per level the forms are measured on (whole maps, evenly spaced over the images)


@dataclass(frozen=True)
class FormChoice:
    """The form chosen for a level, with what it measured on the samples."""

    form: str
    rel_rmse: float
    bits: float  # per stored value after the codec, side data included
    basis: np.ndarray | None = field(default=None, repr=False, compare=False)  # a projected form's, fitted on the samples

    def record(self) -> dict[str, float]:
        """What the manifest keeps of the choice (``StorageSpec.measured``)."""
        return {"rel_rmse": self.rel_rmse, "bits": self.bits}


@dataclass(frozen=True)
class FormMeasure:
    """One form measured on one level's samples."""

    form: str
    rel_rmse: float
    bits: float
    encode_mb_s: float  # float32 megabytes per second: encode + compress
    decode_mb_s: float  # decompress + decode

    def choice(self) -> FormChoice:
        return FormChoice(self.form, self.rel_rmse, self.bits)


def measure(samples: np.ndarray, form: str, codec: str = "zstd", store_values: int | None = None) -> FormMeasure:
    """``samples`` (n, ..., C, H, W) float32 in ``form`` and ``codec``, one chunk per (C, H, W) map as stored; a
    projected form's basis counted over the ``store_values`` values its level will hold (None: not counted).

    Raises:
        Fp16OverflowError: the features do not fit the form (fp16).
    """
    maps = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1, *samples.shape[-3:])
    basis = stored(form).fit(maps[0::2] if len(maps) > 1 else maps)
    x = maps[1::2] if basis is not None and len(maps) > 1 else maps
    blosc = blosc_of(codec, form)
    t0 = time.perf_counter()
    enc = encode(x, form, basis=basis)
    frames = [blosc.encode(np.ascontiguousarray(v)) if blosc else v.tobytes() for v in enc.values]
    t1 = time.perf_counter()
    for k, (frame, v) in enumerate(zip(frames, enc.values, strict=True)):
        raw = np.frombuffer(blosc.decode(frame) if blosc else frame, dtype=v.dtype).reshape(v.shape)
        decode(raw, form, None if enc.scales is None else enc.scales[k], width=x.shape[-1], basis=basis)
    t2 = time.perf_counter()
    size = sum(map(len, frames)) + CHUNK_OVERHEAD * len(frames) + (side_bytes(enc.scales) if enc.scales is not None else 0)
    bits = 8 * size / max(1, x.size)
    if basis is not None and store_values:
        bits += 8 * side_bytes(basis) / store_values  # kept once per store: its share of each value
    mb = x.nbytes / 1e6
    return FormMeasure(form, enc.rel_rmse, bits, mb / max(t1 - t0, 1e-9), mb / max(t2 - t1, 1e-9))


def measure_all(
    samples: np.ndarray, codec: str = "zstd", forms: Sequence[str] = CANDIDATES, store_values: int | None = None
) -> list[FormMeasure]:
    """Every form that can hold ``samples`` measured on them, smallest first."""
    out = []
    for form in forms:
        try:
            out.append(measure(samples, form, codec, store_values))
        except Fp16OverflowError:
            continue
    return sorted(out, key=lambda m: (m.bits, m.rel_rmse))


def pick(measures: Sequence[FormMeasure], max_error: float) -> FormMeasure:
    """The smallest measured form within the budget (the most exact one when none is)."""
    within = [m for m in measures if m.rel_rmse <= max_error]
    if within:
        return min(within, key=lambda m: (m.bits, m.rel_rmse))
    return min(measures, key=lambda m: (m.rel_rmse, m.bits))


def check_budget(max_error: float) -> float:
    if not (math.isfinite(max_error) and 0 < max_error < 1):
        raise InputError(f"--max-error {max_error}: give a relative RMSE budget between 0 and 1, e.g. 0.05 or 0.25")
    return max_error


def choose_forms(
    samples: Mapping[str, np.ndarray], max_error: float, codec: str = "zstd", store_values: Mapping[str, int] | None = None
) -> dict[str, FormChoice]:
    """Level -> the smallest form whose relative RMSE on ``samples`` (float32 features per level, shaped
    (n, ..., C, H, W)) is within ``max_error``, with what it measured (bits per stored value after ``codec``; with
    ``store_values``, the values each level of the store will hold, a projected form's basis is counted in them)."""
    check_budget(max_error)
    out = {}
    for level, x in samples.items():
        best = pick(measure_all(x, codec, store_values=(store_values or {}).get(level)), max_error).choice()
        basis = stored(best.form).fit(x.reshape(-1, *x.shape[-3:]))
        out[level] = best if basis is None else FormChoice(best.form, best.rel_rmse, best.bits, basis)
    return out


def bases_of(choices: Mapping[str, FormChoice]) -> dict[str, np.ndarray]:
    """The bases of the projected forms among ``choices``, by level (what ``fstore.create`` keeps in ``basis/``)."""
    return {level: c.basis for level, c in choices.items() if c.basis is not None}


def storage_of(choices: Mapping[str, FormChoice], base: Any, max_error: float) -> Any:
    """``base`` (a ``StorageSpec``) with the chosen forms, the budget and what the choice measured."""
    import dataclasses

    forms = {level: c.form for level, c in choices.items() if c.form != base.dtype}
    measured = {level: c.record() for level, c in choices.items()}
    return dataclasses.replace(base, forms=forms, max_error=max_error, measured=measured)
