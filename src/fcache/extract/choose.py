"""``extract --max-error``: each level's stored form chosen on the first unit's features, fixed for the whole store.

(A projected form, chosen or given with ``--dtype``, is fitted on the same features: its basis is kept in the store.)

Before the store exists, the driver runs the backbone over the first unit's samples (the next units' when none of
them decodes), keeps evenly spaced maps of each level (at most ``MEASURE_VALUES`` values per level, so SwinV2-L at
1024 measures in seconds) and ``fcache.store.forms.choose_forms`` picks per level the smallest form whose relative
RMSE is within the budget. The choice, the budget and what it measured go into the manifest (``StorageSpec``): one
form per level per store, so every sample decodes the same way, and a resumed run reuses the recorded choice rather
than measuring again. ``fcache plan --codecs`` measures every form on its measuring run's samples the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from fcache.common.errors import InputError
from fcache.extract.backbones import Backbone
from fcache.extract.sources.base import SampleRef, Source
from fcache.extract.stages import SampleDataset
from fcache.spec import Manifest, StorageSpec
from fcache.store import layout
from fcache.store.backends import Backend
from fcache.store.dtypes import stored
from fcache.store.forms import MEASURE_VALUES, bases_of, choose_forms, storage_of

SEARCH_UNITS = 8  # units looked through for samples that decode


def sample_features(
    source: Source, refs: Sequence[SampleRef], backbone: Backbone, m: Manifest, indices: Sequence[int], *, batch_size: int = 8,
    max_values: int = MEASURE_VALUES,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Float32 maps (k, C, H, W) per level of the samples at ``indices`` that decode (k evenly spaced view images, at
    most about ``max_values`` values per level); empty when none decodes."""
    per_image = {lv.name: math.prod(m.level_shape(lv.name)[-3:]) for lv in m.levels}
    images = len(indices) * m.num_views * int(m.preprocessing.frames or 1)
    stride = {name: max(1, math.ceil(images * size / max_values)) for name, size in per_image.items()}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in per_image}
    dataset = SampleDataset(source, list(refs), [int(i) for i in indices], m, timeout=m.dataset.source.decode_timeout)
    waiting: list[torch.Tensor] = []
    seen = 0

    def flush() -> None:
        nonlocal seen
        if waiting:
            for name, f in backbone.forward(torch.stack(waiting)).items():  # (B, C, H, W) on the device
                kept[name] += [f[b].cpu().numpy() for b in range(len(waiting)) if (seen + b) % stride[name] == 0]
            seen += len(waiting)
            waiting.clear()

    for k in range(len(dataset)):
        item = dataset[k]
        if not item.ok:
            continue
        for img in item.pixels:
            waiting.append(img)
            if len(waiting) >= batch_size:
                flush()
    flush()
    return {name: np.stack(maps) for name, maps in kept.items() if maps}


def chosen_storage(
    source: Source, refs: Sequence[SampleRef], backbone: Backbone, m: Manifest, max_error: float | None, *,
    existing: Manifest | None, batch_size: int = 8,
) -> tuple[StorageSpec, dict[str, np.ndarray]]:  # fmt: skip
    """``m.storage`` with each level's form chosen for ``max_error`` (None: the forms of ``m``), and the bases of the
    levels in projected forms, fitted on the first unit's features. A store being resumed (``existing``) keeps the
    choice it recorded for the same budget, and its bases."""
    fitted = any(stored(m.storage.form(lv.name)).fitted for lv in m.levels)
    if existing is not None and (max_error is None or existing.storage.max_error == max_error):
        if max_error is None:
            return m.storage, {}
        old = existing.storage
        return dataclasses.replace(m.storage, forms=dict(old.forms), max_error=max_error, measured=dict(old.measured)), {}
    if max_error is None and not fitted:
        return m.storage, {}
    feats = first_features(source, refs, backbone, m, batch_size=batch_size)
    if max_error is None:
        forms = {name: stored(m.storage.form(name)) for name in feats}
        return m.storage, {name: b for name, d in forms.items() if (b := d.fit(feats[name])) is not None}
    values = {lv.name: m.dataset.n * m.num_views * math.prod(m.level_shape(lv.name)) for lv in m.levels}
    choices = choose_forms(feats, max_error, m.storage.codec, store_values=values)
    return storage_of(choices, m.storage, max_error), bases_of(choices)


def first_features(source: Source, refs: Sequence[SampleRef], backbone: Backbone, m: Manifest, *, batch_size: int = 8) -> dict:
    """``sample_features`` of the first unit, or of the next ones when none of its samples decodes."""
    units = layout.units(m.dataset.n, m.storage.shard_size)
    for unit in units[:SEARCH_UNITS]:
        feats = sample_features(source, refs, backbone, m, range(unit.start, unit.stop), batch_size=batch_size)
        if feats:
            return feats
    raise InputError(
        f"no sample of the first {min(len(units), SEARCH_UNITS)} units decodes, so the stored forms cannot be measured "
        "(--max-error) or fitted (projected forms); check the dataset, or give another --dtype"
    )


def existing_manifest(backend: Backend, overwrite: bool) -> Manifest | None:
    """The manifest of the store a run would resume (None for a new store, or one --overwrite replaces)."""
    return None if overwrite else layout.read_manifest(backend)
