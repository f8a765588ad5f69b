"""The feature store (zarr v3, format version 1): layout, codecs, writer (commit protocol), reader, verify."""

from __future__ import annotations

from fcache.common.errors import CorruptStoreError, Fp16OverflowError, StoreError
from fcache.store.info import describe
from fcache.store.layout import Unit
from fcache.store.reader import FeatureDataset, FeatureStore
from fcache.store.reader import open_store as open
from fcache.store.verify import Problem, VerifyReport, verify
from fcache.store.writer import StoreWriter, TargetSpec, create

__all__ = [
    "CorruptStoreError",
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
]
