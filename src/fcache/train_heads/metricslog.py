"""The metrics of a RUN folder: ``metrics.jsonl`` (one JSON object per logged iteration or evaluation) and
``metrics.csv`` (the same records as a table, a column per key, written again whole when a record brings new columns).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fcache.common.errors import InputError
from fcache.common.files import atomic_file
from fcache.common.records import load_json

METRICS, METRICS_CSV = "metrics.jsonl", "metrics.csv"


class MetricsLog:
    """The metrics files of the RUN folder at ``path`` (a part of ``runfolder.RunDir``)."""

    path: Path

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl and metrics.csv (the table written again when the record brings new columns)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        header = _csv_header(self.path / METRICS_CSV)
        if header is not None and set(record) <= set(header):
            with open(self.path / METRICS_CSV, "a", newline="") as f:
                csv.DictWriter(f, header).writerow(record)
        else:
            self.write_csv(self.metrics())

    def write_csv(self, records: list[dict[str, Any]]) -> None:
        """metrics.csv: one row per record, a column per key (``event`` and ``iter`` first), empty where a record has none."""
        columns = list(dict.fromkeys(["event", "iter", *(k for r in records for k in r)]))
        with atomic_file(self.path / METRICS_CSV) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(records)

    def metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl; InputError naming the line that is not a JSON object."""
        p = self.path / METRICS
        if not p.is_file():
            return []
        out = []
        for k, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            record = load_json(line, f"{p}, line {k},", InputError)
            if not isinstance(record, dict):
                raise InputError(f"{p}, line {k}, is not a JSON object; the file was edited or damaged")
            out.append(record)
        return out

    def truncate_metrics(self, iteration: int) -> None:
        """Drop records past ``iteration`` (logged after the checkpoint a resumed run restarts from)."""
        kept = [r for r in self.metrics() if r.get("iter", 0) <= iteration]
        with atomic_file(self.path / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.write_csv(kept)


def _csv_header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)
