"""The settings of ``fcache extract`` and ``fcache plan``, each written once: a field with its flag.

``ExtractConfig`` nests the dataset's :class:`fcache.spec.SourceConfig` (recorded in the store's manifest); the
``fcache`` command builds both from its flags (``commandline.options_of`` / ``from_flags``), Python callers with
:meth:`ExtractConfig.from_flags` and the same names. Everything is checked by :meth:`ExtractConfig.validate` before
any file is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcache.common.devices import DEVICE_HELP
from fcache.common.errors import ON_ERROR, InputError
from fcache.common.flags import check_flags, flag, from_flags, split_csv
from fcache.spec import LEVEL_NAMES, SourceConfig
from fcache.store.access import StoreAccess

LEVELS = tuple(LEVEL_NAMES.values())
DEFAULT_LEVELS = ("p2", "p3", "p4", "p5")
DEFAULT_DTYPE = "fp16"
# --attention: how the backbone computes its window attention (``fcache.extract.attention`` swaps timm's modules)
ATTENTIONS = {
    "sdpa": "torch's fused scaled_dot_product_attention",
    "timm": "timm's own forward (explicit matmuls and softmax)",
}


def parse_levels(text: str) -> tuple[str, ...]:
    """``p2,p3,p4,p5`` -> level names, checked."""
    return check_levels(split_csv(text))


def check_levels(names: tuple[str, ...]) -> tuple[str, ...]:
    """Known, distinct level names, at least one."""
    bad = [n for n in names if n not in LEVELS]
    if bad:
        raise InputError(f"unknown level {bad[0]!r}; levels are p2, p3, p4, p5 (strides 4 to 32)")
    if not names:
        raise InputError("no level given; name the levels to store, e.g. --levels p3,p4,p5")
    if len(set(names)) != len(names):
        raise InputError(f"{','.join(names)} gives a level twice; give each once")
    return names


def check_attention(name: str) -> str:
    """A known ``--attention``."""
    if name not in ATTENTIONS:
        raise InputError(f"--attention {name}: choose one of {', '.join(ATTENTIONS)}")
    return name


@dataclass(frozen=True, kw_only=True)
class BackboneCompute:
    """How the frozen backbone computes, for every command that builds one. Not recorded in a store: its features
    agree within floating-point rounding either way (as with --device or --batch-size), so a store written with one
    passes ``fcache verify --recompute`` with the other, and resuming may switch."""

    attention: str = flag("sdpa", "How SwinV2 window attention is computed: " + "; ".join(f"{k}: {v}" for k, v in ATTENTIONS.items()) + ".",
                          choices=tuple(ATTENTIONS))  # fmt: skip


def parse_pair(text: str) -> tuple[float, float]:
    """``LO,HI`` -> two floats."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{text!r}: expected LO,HI such as 0.1,2.0") from None
    return lo, hi


@dataclass(frozen=True)
class ExtractConfig(StoreAccess, BackboneCompute):
    """Everything ``fcache extract`` (and ``fcache plan``) needs; ``source`` is recorded in the store's manifest."""

    source: SourceConfig
    out: str = ""
    model: str = flag("swinv2-t", "swinv2-t/s/b/l/g (the paper's 3.0B SwinV2-G), swinv2-g-timm, or any timm model with features_only.")
    weights: str = flag("", "Checkpoint (safetensors or torch) in timm's or the official Swin layout.", show_default=False)
    random_init: bool = flag(False, "Random backbone weights (tests, demo). Never implied.", show_default=False)
    input_size: int = flag(256, "Square canvas side; the window size stays as pretrained.", min=32, max=16384)
    window: int = flag(0, "Attention window; 0: the pretrained one (swinv2-g: the paper's, coco 32, ade20k 40, video 16, else 32).",
                       show_default=False, min=0)  # fmt: skip
    levels: tuple[str, ...] = flag(DEFAULT_LEVELS, "Levels to store (p2..p5 = strides 4..32).", parse=parse_levels,
                                   text_default=",".join(DEFAULT_LEVELS))  # fmt: skip
    dtype: str = flag(DEFAULT_DTYPE, "Stored form of every level (compact forms: docs/store-format.md).",
                      choices="fcache.store.dtypes:DTYPES")  # fmt: skip
    max_error: float | None = flag(
        None, "Relative RMSE budget per level: each level is stored in the smallest form within it, measured on the first "
        "unit (instead of --dtype).", show_default=False, above=0, below=1,
    )  # fmt: skip
    codec: str = flag("zstd", "zstd, zstd:LEVEL (1-9), lz4 or none; CRC32C always.")
    shard_size: int = flag(16, "Samples per shard (= unit of work).", min=1, max=65536)
    views: int = flag(1, "Training views per sample (>1: seeded random resize-crop).", min=1, max=1024)
    view_scale: tuple[float, float] = flag((1.0, 1.0), "LO,HI scale range of training views relative to the plain fit (paper: 0.1,2.0).",
                                           parse=parse_pair, text_default="1.0,1.0", above=0, max=16)  # fmt: skip
    view_flip: bool = flag(True, "Random horizontal flip in training views (when --views > 1).", secondary="--no-view-flip")
    test_views: tuple[str, ...] = flag((), "Evaluation views: flip, ms, or flip,ms.", parse=split_csv, text_default="", show_default=False)
    seed: int = flag(0, "Seed of the training views (and of --random-init weights).", min=0, max=2**63 - 1)
    batch_size: int = flag(8, "Images per backbone forward.", min=1, max=65536)
    num_workers: int = flag(2, "DataLoader processes decoding media.", min=0, max=1024)
    device: str = flag("auto", DEVICE_HELP)
    limit: int = flag(0, "Only the first N samples.", show_default=False, min=0)
    on_error: str = flag("skip", "skip: record a bad sample and go on; fail: stop at the first.", choices=ON_ERROR)
    writers: int = flag(
        0, "Threads encoding + compressing + committing units [default: one per 2 cores].", show_default=False, min=0, max=1024
    )
    overwrite: bool = flag(False, "Replace an existing store of another configuration.", show_default=False)
    no_space_check: bool = flag(
        False, "Start even when the store's estimated size exceeds the free space of --out's filesystem.", show_default=False
    )
    cluster: str = flag(
        "", "local:N: units as dask tasks on a local cluster of N worker processes (CUDA: one per GPU).", show_default=False
    )
    scheduler: str = flag(
        "", "tcp://HOST:PORT: units as dask tasks on a running dask cluster (TLS from dask's config).", show_default=False
    )

    def __post_init__(self) -> None:
        check_flags(self)

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
        from fcache.common.devices import resolve_device
        from fcache.store.codecs import parse_codec
        from fcache.store.dtypes import check_dtype

        check_dtype(self.dtype)
        if self.max_error is not None and self.dtype != DEFAULT_DTYPE:
            raise InputError(f"--dtype {self.dtype} and --max-error: --max-error chooses every level's form; give one of them")
        parse_codec(self.codec)
        check_attention(self.attention)
        try:
            check_levels(tuple(self.levels))
        except InputError as e:
            raise InputError(f"--levels {','.join(self.levels)}: {e}") from None
        if self.input_size % 32:
            raise InputError(f"--input-size {self.input_size} is not a multiple of 32 (the backbone's coarsest stride)")
        lo, hi = self.view_scale
        if not lo <= hi:
            raise InputError(f"--view-scale {lo},{hi}: need LO <= HI")
        if self.on_error not in ON_ERROR:
            raise InputError(f"--on-error {self.on_error}: use {' or '.join(ON_ERROR)}")
        resolve_device(self.device)
        self.options()
        self.target()
        self.check_out()

    def check_out(self) -> None:
        """The store must not be inside the dataset's folder: a rerun would list it as data (and resuming would fail)."""
        if not self.out or "://" in self.out:
            return
        root = Path(self.source.root.split("{")[0]).resolve()
        root = root if root.is_dir() else root.parent
        out = Path(self.out).resolve()
        if out == root or root in out.parents:
            raise InputError(f"--out {self.out} is inside --root {self.source.root}; put the store outside the dataset's folder")

    def target(self) -> Any:
        """The dask cluster the units run on (``fcache.common.cluster.ClusterTarget``), or None for an in-process run."""
        from fcache.common.cluster import parse_target

        # two dask threads per worker: one unit is written while the next decodes and runs the backbone
        return parse_target(self.cluster, self.scheduler, self.device, threads_per_worker=2)


@dataclass(frozen=True)
class PlanConfig:
    """``fcache plan``: how the estimate is made (it takes the extract flags too, without --out)."""

    measure: int = flag(4, "Samples extracted into a temporary folder to measure.", min=0, max=100_000)
    no_run: bool = flag(False, "Measure nothing: sizes from shapes, time from FLOPs (works without weights).", show_default=False)
    device_class: str = flag("h100", "Device class whose measured throughput times the extraction (--no-run).",
                             choices="fcache.extract.throughput:DEVICE_CLASSES")  # fmt: skip
    assume_tflops: float = flag(
        100.0, "Sustained TFLOP/s for the --no-run time estimate where no throughput was measured.", above=0, max=1e7
    )
    codecs: bool = flag(False, "A table per level of every stored form, measured on the run's samples (--no-run: raw sizes).",
                        show_default=False)  # fmt: skip

    def __post_init__(self) -> None:
        check_flags(self)
