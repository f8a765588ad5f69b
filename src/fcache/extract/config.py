"""The settings of ``fcache extract`` and ``fcache plan``, each written once: a field with its flag.

``ExtractConfig`` nests the dataset's :class:`fcache.spec.SourceConfig` (recorded in the store's manifest); the
``fcache`` command builds both from its flags (``cli.options_of`` / ``from_flags``), Python callers with
:meth:`ExtractConfig.from_flags` and the same names. Everything is checked by :meth:`ExtractConfig.validate` before
any file is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcache.common.errors import InputError
from fcache.common.flags import flag, from_flags, split_csv
from fcache.spec import LEVEL_NAMES, SourceConfig
from fcache.store.access import StoreAccess

LEVELS = tuple(LEVEL_NAMES.values())
DEFAULT_LEVELS = ("p2", "p3", "p4", "p5")


def parse_levels(text: str) -> tuple[str, ...]:
    """``p2,p3,p4,p5`` -> level names, checked."""
    names = split_csv(text)
    bad = [n for n in names if n not in LEVELS]
    if bad:
        raise InputError(f"unknown level {bad[0]!r}; levels are p2, p3, p4, p5 (strides 4 to 32)")
    return names


def parse_pair(text: str) -> tuple[float, float]:
    """``LO,HI`` -> two floats."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{text!r}: expected LO,HI such as 0.1,2.0") from None
    return lo, hi


@dataclass(frozen=True)
class ExtractConfig(StoreAccess):
    """Everything ``fcache extract`` (and ``fcache plan``) needs; ``source`` is recorded in the store's manifest."""

    source: SourceConfig
    out: str = ""
    model: str = flag("swinv2-t", "swinv2-t/s/b/l/g or any timm model with features_only.")
    weights: str = flag("", "Checkpoint (safetensors or torch) of the full timm model.", show_default=False)
    random_init: bool = flag(False, "Random backbone weights (tests, demo). Never implied.", show_default=False)
    input_size: int = flag(256, "Square canvas side; the window size stays as pretrained.")
    levels: tuple[str, ...] = flag(DEFAULT_LEVELS, "Levels to store (p2..p5 = strides 4..32).", parse=parse_levels,
                                   text_default=",".join(DEFAULT_LEVELS))  # fmt: skip
    dtype: str = flag("fp16", "Stored feature dtype.", choices="fcache.store.dtypes:DTYPES")
    codec: str = flag("zstd", "zstd, zstd:LEVEL (1-9), lz4 or none; CRC32C always.")
    shard_size: int = flag(16, "Samples per shard (= unit of work).")
    views: int = flag(1, "Training views per sample (>1: seeded random resize-crop).")
    view_scale: tuple[float, float] = flag((1.0, 1.0), "LO,HI scale range of training views relative to the plain fit (paper: 0.1,2.0).",
                                           parse=parse_pair, text_default="1.0,1.0")  # fmt: skip
    view_flip: bool = flag(True, "Random horizontal flip in training views (when --views > 1).", secondary="--no-view-flip")
    test_views: tuple[str, ...] = flag((), "Evaluation views: flip, ms, or flip,ms.", parse=split_csv, text_default="", show_default=False)
    seed: int = flag(0, "Seed of the training views (and of --random-init weights).")
    batch_size: int = flag(8, "Images per backbone forward.")
    num_workers: int = flag(2, "DataLoader processes decoding media.")
    device: str = flag("auto", "cpu, cuda, cuda:K or auto (cuda when available).")
    limit: int = flag(0, "Only the first N samples.", show_default=False)
    on_error: str = flag("skip", "skip: record a bad sample and go on; fail: stop at the first.", choices=("skip", "fail"))
    writers: int = flag(0, "Threads encoding + compressing + committing units [default: one per 2 cores].", show_default=False)
    overwrite: bool = flag(False, "Replace an existing store of another configuration.", show_default=False)
    cluster: str = flag(
        "", "local:N: units as dask tasks on a local cluster of N worker processes (CUDA: one per GPU).", show_default=False
    )
    scheduler: str = flag(
        "", "tcp://HOST:PORT: units as dask tasks on a running dask cluster (TLS from dask's config).", show_default=False
    )

    @classmethod
    def from_flags(cls, **kw: Any) -> ExtractConfig:
        """A config from flag values named as the fields (``dataset`` for the source's kind); others take defaults."""
        source = from_flags(SourceConfig, {"kind": kw.pop("dataset", None), **kw})
        return from_flags(cls, kw, source=source)

    @property
    def video(self) -> bool:
        return self.source.video

    def validate(self) -> None:
        """Check every setting that needs no file; raises InputError naming the flag and the fix."""
        from fcache.store.codecs import parse_codec
        from fcache.store.dtypes import check_dtype

        check_dtype(self.dtype)
        parse_codec(self.codec)
        s = self.source
        positive = {"input-size": self.input_size, "shard-size": self.shard_size, "views": self.views, "batch-size": self.batch_size}
        positive |= {"frames": s.frames, "clips": s.clips, "crops": s.crops}
        bad = [f"--{k} {v}" for k, v in positive.items() if v < 1]
        if bad:
            raise InputError(f"{', '.join(bad)}: must be at least 1")
        if self.input_size % 32:
            raise InputError(f"--input-size {self.input_size} is not a multiple of 32 (the backbone's coarsest stride)")
        lo, hi = self.view_scale
        if not 0 < lo <= hi:
            raise InputError(f"--view-scale {lo},{hi}: need 0 < LO <= HI")
        if self.on_error not in ("skip", "fail"):
            raise InputError(f"--on-error {self.on_error}: use skip or fail")
        self.options()
        self.target()

    def target(self) -> Any:
        """The dask cluster the units run on (``fcache.common.cluster.ClusterTarget``), or None for an in-process run."""
        from fcache.common.cluster import parse_target

        # two dask threads per worker: one unit is written while the next decodes and runs the backbone
        return parse_target(self.cluster, self.scheduler, self.device, threads_per_worker=2)
