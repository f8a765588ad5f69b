"""Where a head's metrics go besides RUN/metrics.jsonl and metrics.csv (``RunDir.log``): TensorBoard or Weights & Biases.

``--logger auto`` (the default) writes TensorBoard event files (``torch.utils.tensorboard``) into the RUN folder when
``tensorboard`` is installed; ``tensorboard`` requires it, ``wandb`` logs to a Weights & Biases run instead (its files in
RUN/wandb; ``WANDB_MODE=offline`` works without network), ``none`` to neither. Every metrics.jsonl record becomes
scalars: a training record ``train/<key>`` (loss components, lr, samples_per_s, time_s), an evaluation
``eval/<metric>``, at the record's iteration. After each evaluation, pictures of its predictions (``pictures.py``)
go under ``eval/<name>``. A resumed run drops what the discarded iterations wrote from its earlier event files (rewritten
without the events after the checkpoint, as metrics.jsonl drops their records) and starts a new one (with TensorBoard's
``purge_step`` too).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fcache.common.errors import InputError
from fcache.common.files import atomic_file
from fcache.train_heads.runfolder import RunDir

LIBRARY = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package it needs
NOT_SCALARS = {"event", "iter", "store", "samples", "eval_dir"}


def installed(logger: str) -> bool:
    return importlib.util.find_spec(LIBRARY[logger]) is not None


def resolve_logger(name: str) -> str:
    """The logger ``--logger name`` stands for here: ``auto`` is tensorboard when installed, else none.

    Raises:
        InputError: a logger whose package is not installed.
    """
    if name == "auto":
        return "tensorboard" if installed("tensorboard") else "none"
    if name in LIBRARY and not installed(name):
        raise InputError(f"--logger {name}: {LIBRARY[name]} is not installed here; pip install {LIBRARY[name]}, or use --logger none")
    return name


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as logger tags: ``train/<key>`` for a training record, ``eval/<metric>`` for an evaluation."""
    event = record.get("event")
    if event not in (None, "eval"):
        return {}
    prefix = "eval/" if event == "eval" else "train/"
    numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {prefix + k: float(v) for k, v in numbers.items() if k not in NOT_SCALARS}


class Sink(Protocol):
    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def images(self, step: int, pictures: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in the RUN folder; a resumed run purges the steps after its checkpoint."""

    def __init__(self, run: RunDir, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        earlier = sorted(run.path.glob(EVENTS))
        for path in earlier:
            trim_events(path, start)
        self.writer = SummaryWriter(log_dir=str(run.path), purge_step=start + 1 if earlier else None)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def images(self, step: int, pictures: Mapping[str, np.ndarray]) -> None:
        for name, picture in pictures.items():
            self.writer.add_image(f"eval/{name}", picture, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


EVENTS = "events.out.tfevents.*"


def trim_events(path: Path, last: int) -> None:
    """Rewrite the event file ``path`` without the events of steps after ``last`` (those of iterations a resume discards);
    a record cut by a killed writer ends the file."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    records = list(RawEventFileLoader(str(path)).Load())
    kept = [r for r in records if Event.FromString(r).step <= last]
    if len(kept) == len(records):
        return
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        writer = RecordWriter(f)
        for r in kept:
            writer.write(r)


class Wandb:
    """A Weights & Biases run named after the RUN folder, resumed under the same id when the RUN is resumed."""

    def __init__(self, run: RunDir) -> None:
        import wandb

        record = run.require_config()
        ident = json.dumps([str(run.path.absolute()), record.identity()], sort_keys=True, default=str)
        self.wandb = wandb
        self.run = wandb.init(project="fcache", name=run.path.name, dir=str(run.path), config=record.to_dict(),
                              id=hashlib.sha256(ident.encode()).hexdigest()[:16], resume="allow")  # fmt: skip

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def images(self, step: int, pictures: Mapping[str, np.ndarray]) -> None:
        self.run.log({f"eval/{name}": self.wandb.Image(p) for name, p in pictures.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """A head's records: into its RUN folder (metrics.jsonl, metrics.csv) and, on the process that writes RUN, its sink."""

    def __init__(self, run: RunDir, sink: Sink | None = None) -> None:
        self.run, self.sink = run, sink

    @classmethod
    def open(cls, run: RunDir, logger: str, start: int, *, main: bool = True) -> RunLog:
        """The log of ``run`` continuing after iteration ``start``, with the sink of ``logger`` (on the main process)."""
        name = resolve_logger(logger) if main else "none"
        sink: Sink | None = TensorBoard(run, start) if name == "tensorboard" else Wandb(run) if name == "wandb" else None
        return cls(run, sink)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(record)
        if self.sink is not None:
            values = scalars(record)
            if values:
                self.sink.scalars(int(record["iter"]), values)

    def pictures(self, step: int, pictures: Mapping[str, np.ndarray]) -> None:
        if self.sink is not None and pictures:
            self.sink.images(step, pictures)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
