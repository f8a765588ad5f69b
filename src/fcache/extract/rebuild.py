"""Rebuild a store's source and frozen backbone from its manifest alone (recompute, online features, bench).

The source comes from the recorded ``dataset.source`` (every extract flag of the dataset: kind, paths, split, video
sampling, limits, ``--drop-degenerate-boxes``), so nothing has to be passed again.

The weights: ``random-init`` is re-seeded from the manifest, a timm tag is fetched again, a weights
file must be given (``weights``) and must match the recorded sha256.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcache.common.errors import InputError
from fcache.extract.backbones import RANDOM_INIT, Backbone, build_backbone
from fcache.extract.sources import build_source
from fcache.extract.sources.base import SampleRef, Source
from fcache.spec import Manifest


@dataclass
class Rebuilt:
    source: Source
    refs: list[SampleRef]
    backbone: Backbone


def rebuild(manifest: Manifest, keys: list[str], *, weights: str = "", device: str = "cpu", attention: str = "sdpa") -> Rebuilt:
    """The source (listing exactly ``keys``) and backbone that produced a store.

    Raises:
        ValueError: a weights file is needed or differs, or the dataset no longer lists the store's samples.
    """
    ds = manifest.dataset
    backbone = backbone_of(manifest, weights=weights, device=device, attention=attention)
    source = build_source(ds.source)
    refs = source.samples()
    if [r.key for r in refs[: len(keys)]] != list(keys):
        raise InputError(f"the dataset at {ds.root} no longer lists the samples the store holds; the original data is needed")
    return Rebuilt(source, refs[: len(keys)], backbone)


def backbone_of(manifest: Manifest, *, weights: str = "", device: str = "cpu", attention: str = "sdpa") -> Backbone:
    """The frozen backbone that produced (or produces) a store, built from its manifest (``attention``: how it computes
    its window attention, which the manifest does not record: either gives the store's features).

    Raises:
        ValueError: the store was extracted from a weights file and ``weights`` is missing or another file.
    """
    bb, pre = manifest.backbone, manifest.preprocessing
    from_file = bb.weights != RANDOM_INIT and not bb.weights.startswith("timm:")
    if from_file and not weights:
        raise InputError(f"the store was extracted from a weights file (sha256 {bb.weights[:12]}...); pass the same file with --weights")
    backbone = build_backbone(
        bb.alias,
        input_size=bb.input_size,
        levels=[lv.name for lv in bb.levels],
        weights=weights or None,
        random_init=bb.weights == RANDOM_INIT,
        seed=pre.seed,
        device=device,
        window=bb.window,
        attention=attention,
    )
    if from_file and backbone.info.weights != bb.weights:
        raise InputError(f"--weights {weights} is not the file the store was extracted with (its sha256 differs)")
    return backbone
