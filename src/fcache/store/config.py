"""The settings of the store commands ``fcache info``, ``verify``, ``copy``, ``recode`` and ``export-wds``, each written
once: a field with its flag (``fcache.cli`` builds the options from them). Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcache.common.devices import DEVICE_HELP
from fcache.common.flags import check_flags, flag, required, split_csv
from fcache.store.access import StoreAccess
from fcache.store.backends import parse_size


@dataclass(frozen=True)
class InfoConfig(StoreAccess):
    """``fcache info STORE``."""

    store: str

    def __post_init__(self) -> None:
        self.options()


@dataclass(frozen=True)
class VerifyConfig(StoreAccess):
    """``fcache verify STORE``: how much is checked, and the samples extracted again to compare (``--recompute``)."""

    store: str
    fast: bool = flag(False, "Check presence, sizes and statuses only; skip checksums and decoding.", show_default=False)
    sample: float = flag(1.0, "Check the files of this fraction of the committed units (seeded), e.g. 0.01 on a huge store.", above=0,
                         max=1)  # fmt: skip
    recompute: int = flag(0, "Also re-extract K random samples and compare them with the store.", show_default=False, min=0)
    weights: str = flag("", "With --recompute: the weights file used.", path="file", show_default=False)
    device: str = flag("auto", f"With --recompute: where to run the backbone: {DEVICE_HELP}")
    tolerance: float | None = flag(None, "With --recompute: relative RMSE allowed (default by dtype).", show_default=False, above=0)

    def __post_init__(self) -> None:
        check_flags(self)
        self.options()


@dataclass(frozen=True)
class CopyConfig(StoreAccess):
    """``fcache copy SRC DST``."""

    src: str
    dst: str
    workers: int = flag(4, "Units copied at once.", min=1, max=1024)

    def __post_init__(self) -> None:
        check_flags(self)
        self.options()


@dataclass(frozen=True)
class RecodeConfig(StoreAccess):
    """``fcache recode SRC --out DST``: DST's stored form, given for every level or chosen per level for a budget."""

    src: str
    out: str = required("The store to create (or finish): a folder, s3://... or gs://...", path="new-store")
    dtype: str | None = flag(None, "Stored form of every level of DST (compact forms: docs/store-format.md).",
                             choices="fcache.store.dtypes:DTYPES", show_default=False)  # fmt: skip
    max_error: float | None = flag(
        None, "Instead of --dtype: a relative RMSE budget per level; each level of DST is stored in the smallest form within "
        "it, measured on SRC's first committed unit.", show_default=False, above=0, below=1,
    )  # fmt: skip
    workers: int = flag(0, "Units recoded at once [default: one per 2 cores].", show_default=False, min=0, max=1024)

    def __post_init__(self) -> None:
        check_flags(self)
        self.options()


@dataclass(frozen=True)
class ExportWdsConfig(StoreAccess):
    """``fcache export-wds STORE --out DIR``: the tar shards to write."""

    store: str
    out: str = required("Folder or URL for the tar shards.", path="new-store")
    shard_size: str = flag("1GB", "Bytes per tar shard, e.g. 1GB or 512MiB.")
    levels: tuple[str, ...] = flag((), "Levels to export, e.g. p4,p5 [default: all].", parse=split_csv, text_default="", show_default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        check_flags(self)
        self.options()
        parse_size(self.shard_size)
