"""The manifest an extraction writes, made from its config, the dataset's samples and the backbone's description.

Imports no torch: ``fcache plan`` makes it from ``extract.catalog``'s description of a known backbone, without
building it; ``fcache extract`` from the backbone it built.
"""

from __future__ import annotations

from fcache.common.errors import InputError
from fcache.extract.config import ExtractConfig
from fcache.extract.sources.base import SampleRef, Source
from fcache.spec import BackboneInfo, DatasetInfo, Manifest, Preprocessing, StorageSpec, keys_digest

MS_SCALES = (0.5, 0.75)


def expand_test_views(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """``("flip", "ms")`` -> the named test views stored after the training views."""
    unknown = set(tokens) - {"flip", "ms"}
    if unknown:
        raise InputError(f"unknown test view(s) {', '.join(sorted(unknown))}; use flip and/or ms")
    names = ["flip"] if "flip" in tokens else []
    for s in MS_SCALES if "ms" in tokens else ():
        names.append(f"s{s}")
        if "flip" in tokens:
            names.append(f"s{s}+flip")
    return tuple(names)


def preprocessing_of(cfg: ExtractConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> Preprocessing:
    """How samples become backbone inputs: the backbone's normalisation and the views the flags ask for."""
    video, src = cfg.video, cfg.source
    return Preprocessing(
        mean=mean,
        std=std,
        views=1 if video else cfg.views,
        view_scale=tuple(cfg.view_scale) if cfg.views > 1 and not video else (1.0, 1.0),  # type: ignore[arg-type]
        view_flip=cfg.view_flip and cfg.views > 1 and not video,
        test_views=() if video else expand_test_views(cfg.test_views),
        seed=cfg.seed,
        frames=src.frames if video else None,
        clips=src.clips if video else 1,
        crops=src.crops if video else 1,
    )


def selected_samples(cfg: ExtractConfig, source: Source) -> list[SampleRef]:
    """The samples the extraction covers (the first ``--limit``), the dataset's metadata checked."""
    refs = source.samples()
    if cfg.limit:
        refs = refs[: cfg.limit]
    if not refs:
        raise InputError(f"{cfg.source.root}: the dataset has no samples; check --root/--annotations/--split")
    return refs


def manifest_of(
    cfg: ExtractConfig, source: Source, refs: list[SampleRef], backbone: BackboneInfo, mean: tuple[float, ...], std: tuple[float, ...]
) -> Manifest:
    """The manifest of extracting ``refs`` of ``source`` with ``backbone`` as ``cfg`` says."""
    dataset = DatasetInfo(
        source=cfg.source, n=len(refs), digest=keys_digest([r.key for r in refs]), task=source.task, label_names=tuple(source.label_names())
    )
    return Manifest(
        backbone=backbone,
        preprocessing=preprocessing_of(cfg, mean, std),
        storage=StorageSpec(dtype=cfg.dtype, codec=cfg.codec, shard_size=cfg.shard_size),
        dataset=dataset,
    )
