"""The ledger record of a committed unit (``ledger/done/<unit>.json``): what the commit protocol wrote, checksummed.

A record says which files the unit has (possibly none: every sample of it failed), with their sizes and sha256,
the statuses of its samples, the errors of the failed ones and the quantisation sums of each level. Readers and
``fcache verify`` trust the ledger, never the existence of a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fcache.common.errors import CorruptStoreError
from fcache.common.records import Record


@dataclass(frozen=True)
class FileRecord(Record):
    """One file a unit wrote: its size and sha256."""

    size: int
    sha256: str


@dataclass(frozen=True)
class LedgerRecord(Record):
    """One committed unit: samples ``[start, stop)``, their statuses, the files written and what was measured."""

    ERROR = CorruptStoreError
    DAMAGED = "run `fcache verify` on the store"

    unit: int
    start: int
    stop: int
    status: tuple[int, ...]  # Status code of each sample
    status_counts: dict[str, int]
    files: dict[str, FileRecord]  # path relative to the store -> size and sha256
    quant: dict[str, tuple[float, float]]  # level -> (sum of squared quantisation errors, sum of squared values)
    errors: tuple[dict[str, Any], ...] = ()  # one per failed sample: key, index, status, message
    host: str = ""
    pid: int = 0
    seconds: float = 0.0
    time: float = 0.0
    token: str = ""  # unique per commit: tells our own record from another writer's after a retried conditional write
    samples: int = field(default=-1)  # stop - start (written for readers of the raw JSON)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", self.stop - self.start)
        if len(self.status) != self.samples:
            raise ValueError(f"{len(self.status)} statuses for samples {self.start}-{self.stop - 1}")

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())
