"""``fcache verify --recompute K``: re-extract K random samples and compare them with the store.

The source, views and backbone are rebuilt from the manifest alone (plus ``--weights`` when the
store was made from a weights file, checked against the recorded sha256). A sample-level pair
fails when its relative RMSE exceeds the tolerance of the store's dtype.
"""

from __future__ import annotations

import numpy as np

from fcache import store as fstore
from fcache.extract.backbones import RANDOM_INIT, build_backbone
from fcache.extract.sources import build_source
from fcache.extract.work import SampleDataset
from fcache.spec import Status
from fcache.store import Problem

# relative RMSE allowed between stored and recomputed features, per stored dtype (same device type)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2, "int8": 2e-2}


def recompute(path: str, k: int, *, weights: str = "", device: str = "cpu", seed: int = 0, tolerance: float | None = None) -> list[Problem]:
    """Problems found re-extracting ``k`` random samples that have features (empty when all agree)."""
    s = fstore.open(path)
    m = s.manifest
    bb_info, pre, ds = m.backbone, m.preprocessing, m.dataset
    if bb_info.weights not in (RANDOM_INIT,) and not bb_info.weights.startswith("timm:") and not weights:
        raise ValueError(f"{path} was extracted from a weights file (sha256 {bb_info.weights[:12]}...); pass the same file with --weights")
    backbone = build_backbone(
        bb_info.alias,
        input_size=bb_info.input_size,
        levels=[lv.name for lv in bb_info.levels],
        weights=weights or None,
        random_init=bb_info.weights == RANDOM_INIT,
        seed=pre.seed,
        device=device,
    )
    if weights and backbone.info.weights != bb_info.weights:
        raise ValueError(f"--weights {weights} is not the file this store was extracted with (sha256 differs)")
    source = build_source(ds.kind, ds.root, annotations=ds.annotations or None, split=ds.split, frames=pre.frames or 16, clips=pre.clips)
    refs = source.samples()
    if [r.key for r in refs] != [str(x) for x in s.keys]:
        raise ValueError(f"the dataset at {ds.root} no longer lists the samples this store holds; recompute needs the original data")
    candidates = s.ok_indices
    chosen = np.random.default_rng(seed).choice(candidates, size=min(k, len(candidates)), replace=False)
    tol = tolerance if tolerance is not None else TOLERANCE[m.storage.dtype]
    dataset = SampleDataset(source, refs, [int(i) for i in sorted(chosen)], m)
    problems = []
    for j in range(len(dataset)):
        item = dataset[j]
        if not Status(item["status"]).has_features:
            problems.append(Problem("recompute", f"sample {item['index']}", f"no longer decodes ({item['message']})"))
            continue
        feats = backbone.forward(item["pixels"])
        for name, f in feats.items():
            got = f.cpu().numpy()
            if m.video:
                got = got.reshape(m.num_views, int(pre.frames or 1), *got.shape[1:])
            stored = s.read(name, item["index"])
            rel = float(np.sqrt(np.square(stored - got).sum() / max(np.square(got).sum(), 1e-30)))
            if rel > tol:
                problems.append(
                    Problem(
                        "recompute",
                        f"features/{name}",
                        f"sample {item['index']} ({item['key']}) differs: relative RMSE {rel:.2e} > {tol:.0e}",
                        (item["index"], item["index"]),
                    )
                )
    return problems
