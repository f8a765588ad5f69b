"""``fcache verify --recompute K``: re-extract K random samples and compare them with the store.

The source, views and backbone are rebuilt from the manifest alone (plus ``--weights`` when the
store was made from a weights file, checked against the recorded sha256). The recomputed features are encoded in
their level's stored form (a projected form on the store's basis) and decoded again, as the extraction did, so that
what is compared is what the store should hold: a sample-level pair fails when its relative RMSE exceeds the
tolerance of its level's form (``DTYPES``), which covers the rounding that device differences can tip. (Compared with
the float features instead, a lossy form's own error, which varies from sample to sample, would drown a fault.)
"""

from __future__ import annotations

import numpy as np

from fcache import store as fstore
from fcache.extract.rebuild import rebuild
from fcache.extract.stages import SampleDataset
from fcache.store import Problem
from fcache.store.dtypes import decode, encode, stored


def recompute(
    path: str,
    k: int,
    *,
    weights: str = "",
    device: str = "cpu",
    seed: int = 0,
    tolerance: float | None = None,
    storage_options: dict | None = None,
    attention: str = "sdpa",
) -> list[Problem]:
    """Problems found re-extracting ``k`` random samples that have features (empty when all agree)."""
    s = fstore.FeatureStore(path, storage_options=storage_options)
    m = s.manifest
    r = rebuild(m, [str(x) for x in s.keys], weights=weights, device=device, attention=attention)
    chosen = np.random.default_rng(seed).choice(s.ok_indices, size=min(k, len(s.ok_indices)), replace=False)
    tols = {lv: tolerance if tolerance is not None else stored(m.storage.form(lv)).tolerance for lv in s.level_names}
    dataset = SampleDataset(r.source, r.refs, [int(i) for i in sorted(chosen)], m)
    problems = []
    for j in range(len(dataset)):
        item = dataset[j]
        if not item.ok:
            problems.append(Problem("recompute", f"sample {item.index}", f"no longer decodes ({item.message})"))
            continue
        for name, f in r.backbone.forward(item.pixels).items():
            got = f.cpu().numpy()
            if m.video:
                got = got.reshape(m.num_views, int(m.preprocessing.frames or 1), *got.shape[1:])
            kept = s.read(name, item.index)
            form, basis = m.storage.form(name), s.bases.get(name)
            enc = encode(got, form, name, basis)  # what the extraction would have stored
            got = decode(enc.values, form, enc.scales, s.width(name), basis)
            rel = float(np.sqrt(np.square(kept - got).sum() / max(np.square(got).sum(), 1e-30)))
            if rel > tols[name]:
                where = (item.index, item.index)
                message = f"sample {item.index} ({item.key}) differs: relative RMSE {rel:.2e} > {tols[name]:.2g}"
                problems.append(Problem("recompute", f"features/{name}", message, where))
    return problems
