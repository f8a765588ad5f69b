"""What every source (raw dataset reader) gives the extraction runner.

A source lists its samples once (validating all metadata up front and reporting every problem at
once), says which target arrays the store needs, and decodes one sample at a time inside a
DataLoader worker. Decoding failures are ``SampleError``s carrying the sample's status.
``SampleError`` and ``Decoded`` live in ``fcache.extract.decode`` (which must not import this package) and are
re-exported here as part of the contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fcache.common.errors import MetadataError
from fcache.extract.decode import Decoded, SampleError  # defined with the decoders that return / raise them
from fcache.spec import Targets
from fcache.store import TargetSpec

__all__ = ["Decoded", "MetadataError", "SampleError", "SampleRef", "Source", "write_driver_targets"]

TARGET_BLOCK_UNITS = 256  # units of driver targets written at once (4096 samples at the default shard size)


@dataclass(frozen=True)
class SampleRef:
    """One sample as listed by a source: its key in the store and where its media is."""

    key: str  # the store's samples/key: COCO image id as a string, or a path relative to --root
    path: str  # absolute media path ('' when the media lives elsewhere, e.g. inside a tar shard)
    label: int = -1  # class index for classification / video sources
    extra: Mapping[str, Any] = field(default_factory=dict)  # source-specific (annotation path, tar member...)


class ClassListing(Protocol):
    @property
    def classes(self) -> tuple[str, ...]: ...

    @property
    def labelled(self) -> bool: ...


class LabelTargets:
    """The label target of sources listing classes (folder, video): ``targets/label`` when the listing is labelled."""

    def listing(self) -> ClassListing:
        raise NotImplementedError

    def label_names(self) -> tuple[str, ...]:
        return self.listing().classes

    def target_specs(self) -> dict[str, TargetSpec]:
        return {Targets.LABEL: TargetSpec("int64", (), fill=-1)} if self.listing().labelled else {}

    def target_attrs(self) -> dict[str, Any]:
        return {}

    def driver_targets(self, refs: list[SampleRef]) -> dict[str, np.ndarray]:
        if not self.listing().labelled:
            return {}
        return {Targets.LABEL: np.array([r.label for r in refs], dtype=np.int64)}


class Source(Protocol):
    """A raw dataset. Implementations: the SOURCES table (coco, ade20k, seg-folder, depth-folder, video, folder, wds)."""

    kind: str  # its SOURCES key
    root: Path

    @property
    def task(self) -> str:
        """The task its targets serve (a TASKS key: detection, segmentation, depth, ...); "" (folder / wds: known once the
        files are listed)."""
        ...

    def samples(self) -> list[SampleRef]:
        """All samples in a deterministic order, metadata validated (raises MetadataError listing all problems)."""
        ...

    def label_names(self) -> tuple[str, ...]:
        """Class names, index = label (empty for detection: categories travel in target attrs)."""
        ...

    def target_specs(self) -> dict[str, TargetSpec]:
        """The ``targets/<name>`` arrays this source's stores hold (see ``fcache.spec.Targets``)."""
        ...

    def target_attrs(self) -> dict[str, Any]:
        """Attributes of the ``targets/`` group (COCO: ``categories``)."""
        ...

    def driver_targets(self, refs: list[SampleRef]) -> dict[str, np.ndarray]:
        """Targets known from metadata alone, written by the driver at store creation: name -> (N, ...)."""
        ...

    def decode(self, ref: SampleRef) -> Decoded:
        """Decode one sample (runs in DataLoader workers). Raises SampleError with the sample's status."""
        ...


def write_driver_targets(writer: Any, source: Source, refs: list[SampleRef]) -> None:
    """The targets a source knows from metadata (COCO's annotations as JSON) into a new store (a
    ``fcache.store.StoreWriter``), block by block of whole shards: one block's values exist at a time, not the dataset's."""
    block = writer.manifest.storage.shard_size * TARGET_BLOCK_UNITS
    for start in range(0, len(refs), block):
        for name, values in source.driver_targets(refs[start : start + block]).items():
            writer.write_targets(name, values, start)
