"""The ledger record of a committed unit (``ledger/done/<unit>.json``): what the commit protocol wrote, checksummed.

A record says which files the unit has (possibly none: every sample of it failed), with their sizes and sha256,
the statuses of its samples, the errors of the failed ones and the quantisation sums of each level. Readers and
``fcache verify`` trust the ledger, never the existence of a file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fcache.common.errors import CorruptStoreError
from fcache.common.records import check_record


@dataclass(frozen=True)
class FileRecord:
    """One file a unit wrote: its size and sha256."""

    size: int
    sha256: str


@dataclass(frozen=True)
class LedgerRecord:
    """One committed unit: samples ``[start, stop)``, their statuses, the files written and what was measured."""

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

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status"] = list(self.status)
        d["quant"] = {k: list(v) for k, v in self.quant.items()}
        d["errors"] = [dict(e) for e in self.errors]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "ledger record") -> LedgerRecord:
        """A record read from JSON; CorruptStoreError naming ``where`` and the field when it is not one."""
        check_record(cls, d, where, CorruptStoreError)
        try:
            rec = cls(
                unit=int(d["unit"]),
                start=int(d["start"]),
                stop=int(d["stop"]),
                status=tuple(int(x) for x in d["status"]),
                status_counts={str(k): int(v) for k, v in d["status_counts"].items()},
                files={str(k): FileRecord(int(v["size"]), str(v["sha256"])) for k, v in d["files"].items()},
                quant={str(k): (float(v[0]), float(v[1])) for k, v in d["quant"].items()},
                errors=tuple(dict(e) for e in d.get("errors", ())),
                host=str(d.get("host", "")),
                pid=int(d.get("pid", 0)),
                seconds=float(d.get("seconds", 0.0)),
                time=float(d.get("time", 0.0)),
                token=str(d.get("token", "")),
            )
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            raise CorruptStoreError(f"{where} is malformed ({e}); run `fcache verify` on the store") from None
        if len(rec.status) != rec.samples:
            raise CorruptStoreError(f"{where} lists {len(rec.status)} statuses for samples {rec.start}-{rec.stop - 1}")
        return rec
