"""The feature store (zarr v3, format version 1): backends (local disk, object storage), layout, dtypes, codecs,
writer (commit protocol), leases, reader (+ the remote fetch path and its disk cache), verify, copy, webdataset export.

``fcache.store.open(path or URL)`` reads a store, ``fcache.store.create(...)`` makes one. The names below are imported when
first used, so that importing a light part of the package (``fcache.store.dtypes``) does not import zarr and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcache.common.errors import CorruptStoreError, Fp16OverflowError, StoreError
    from fcache.store import layout
    from fcache.store.checks import Problem, VerifyReport, verify
    from fcache.store.copy import CopySummary, copy_store
    from fcache.store.dataset import FeatureDataset
    from fcache.store.info import describe
    from fcache.store.layout import Unit
    from fcache.store.reader import FeatureStore
    from fcache.store.reader import open_store as open
    from fcache.store.webdataset import WdsExport, export_wds
    from fcache.store.writer import StoreWriter, TargetSpec, create

_EXPORTS = {
    "CorruptStoreError": ("fcache.common.errors", "CorruptStoreError"),
    "Fp16OverflowError": ("fcache.common.errors", "Fp16OverflowError"),
    "StoreError": ("fcache.common.errors", "StoreError"),
    "FeatureDataset": ("fcache.store.dataset", "FeatureDataset"),
    "FeatureStore": ("fcache.store.reader", "FeatureStore"),
    "open": ("fcache.store.reader", "open_store"),
    "Problem": ("fcache.store.checks", "Problem"),
    "VerifyReport": ("fcache.store.checks", "VerifyReport"),
    "verify": ("fcache.store.checks", "verify"),
    "StoreWriter": ("fcache.store.writer", "StoreWriter"),
    "TargetSpec": ("fcache.store.writer", "TargetSpec"),
    "create": ("fcache.store.writer", "create"),
    "Unit": ("fcache.store.layout", "Unit"),
    "describe": ("fcache.store.info", "describe"),
    "copy_store": ("fcache.store.copy", "copy_store"),
    "CopySummary": ("fcache.store.copy", "CopySummary"),
    "export_wds": ("fcache.store.webdataset", "export_wds"),
    "WdsExport": ("fcache.store.webdataset", "WdsExport"),
}

__all__ = [
    "CopySummary",
    "CorruptStoreError",
    "WdsExport",
    "copy_store",
    "export_wds",
    "FeatureDataset",
    "FeatureStore",
    "Fp16OverflowError",
    "Problem",
    "StoreError",
    "StoreWriter",
    "TargetSpec",
    "Unit",
    "VerifyReport",
    "create",
    "describe",
    "open",
    "verify",
    "layout",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("layout", "dtypes", "codecs", "reader", "writer", "checks", "info", "lease", "leases", "records", "backends", "access",
                "cache", "fetch", "copy", "webdataset", "dataset", "transit"):  # fmt: skip
        return importlib.import_module(f"fcache.store.{name}")
    raise AttributeError(f"module 'fcache.store' has no attribute {name!r}")
