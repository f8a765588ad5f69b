"""``fcache extract``: run the frozen backbone once over a dataset and commit its features unit by unit.

In process, three stages overlap so the device never waits on I/O: decoding + views in DataLoader workers,
the backbone on the device in the main thread, encoding + compression + commit on writer threads. With
``--cluster`` / ``--scheduler`` the units run as dask tasks instead (``executor.py``). Either way the driver holds
the store's lease (``fcache.store.lease``), and the commit protocol makes a rerun finish only the missing units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fcache import store as fstore
from fcache.common.cluster import ClusterTarget
from fcache.common.devices import resolve_device
from fcache.common.errors import Interrupted
from fcache.extract import space
from fcache.extract.backbones import Backbone, build_backbone, default_window
from fcache.extract.choose import chosen_storage, existing_manifest
from fcache.extract.config import ExtractConfig
from fcache.extract.manifests import manifest_of, selected_samples
from fcache.extract.sources import build_source
from fcache.extract.sources.base import SampleRef, Source, write_driver_targets
from fcache.extract.stages import Batcher, SampleDataset, SampleItem, UnitAssembler, check_sample
from fcache.spec import Manifest
from fcache.store import layout
from fcache.store.backends import ROOT_META, Backend, open_backend
from fcache.store.info import human
from fcache.store.lease import interrupted_message, leased_store
from fcache.store.writer import default_writers


@dataclass
class ExtractSummary:
    """What a run did; ``exit_code`` is 0 when no sample failed, 3 when some were skipped."""

    store: str
    samples: int
    processed: int
    status_counts: dict[str, int]
    seconds: float
    images_per_s: float
    bytes_written: int
    levels: list[dict[str, Any]] = field(default_factory=list)
    compression_ratio: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if set(self.status_counts) <= {"ok", "video_partial"} else 3

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


def prepare(cfg: ExtractConfig, *, meta: bool = False, source: Source | None = None) -> tuple[Source, list[SampleRef], Backbone, Manifest]:
    """Validate the config and the dataset's metadata, build the backbone and the manifest (no writes).

    ``source``: the dataset's source already built from ``cfg.source`` (its listing is kept by the source).
    """
    cfg.validate()
    source = source or build_source(cfg.source)
    refs = selected_samples(cfg, source)
    backbone = build_backbone(
        cfg.model,
        input_size=cfg.input_size,
        levels=cfg.levels,
        weights=cfg.weights or None,
        random_init=cfg.random_init,
        seed=cfg.seed,
        device=resolve_device(cfg.device),
        meta=meta,
        window=cfg.window or default_window(cfg.model, source.task),
        attention=cfg.attention,
    )
    manifest = manifest_of(cfg, source, refs, backbone.info, backbone.mean, backbone.std)
    return source, refs, backbone, manifest


def run_extract(cfg: ExtractConfig, show_progress: bool = False) -> ExtractSummary:
    """Extract (or resume extracting) ``cfg.out``, with a progress bar on stderr when asked.

    Raises:
        LeaseHeld: another driver is running on the store.
    """
    t0 = time.perf_counter()
    target = cfg.target()
    # a cluster's workers build their own backbones: the driver's, for the manifest only, stays off the GPUs
    source, refs, backbone, manifest = prepare(dataclasses.replace(cfg, device="cpu") if target else cfg)
    # each level's form measured on the first unit for --max-error, projected forms fitted (or the resumed store's)
    resumed = existing_manifest(open_backend(cfg.out, cfg.options()), cfg.overwrite)
    storage, bases = chosen_storage(source, refs, backbone, manifest, cfg.max_error, existing=resumed, batch_size=cfg.batch_size)
    manifest = dataclasses.replace(manifest, storage=storage)
    if not cfg.no_space_check:  # before anything is created
        existing = layout.disk_bytes(cfg.out) if cfg.overwrite and "://" not in cfg.out and fstore_exists(cfg.out) else 0
        space.check_space(cfg.out, manifest, space.needed(cfg.out, manifest, overwrite=cfg.overwrite), freed=existing)
    try:
        with _leased_store(cfg, source, refs, manifest, bases) as writer:
            pending = writer.pending()
            n = sum(len(u) for u in pending)
            stats = _Stats()
            if pending:
                with _progress_bar(n, stats, t0, show_progress) as progress:
                    if target is None:
                        _pipeline(cfg, source, refs, backbone, writer, pending, stats, progress)
                    else:
                        del backbone
                        _on_cluster(cfg, target, source, refs, pending, stats, progress)
            done = writer.finalize()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(open_backend(cfg.out, cfg.options()))) from None
    if done["units_committed"] < done["units_total"]:
        left = done["units_total"] - done["units_committed"]
        raise fstore.StoreError(f"{left} unit(s) of {cfg.out} are not committed (another writer held their lock); rerun this command")
    info = fstore.describe(writer.backend)
    return ExtractSummary(
        store=str(cfg.out),
        samples=len(refs),
        processed=n,
        status_counts=info["status_counts"],
        seconds=time.perf_counter() - t0,
        images_per_s=stats.images / max(stats.busy, 1e-9),
        bytes_written=stats.bytes,
        levels=info["levels"],
        compression_ratio=info["compression_ratio"],
        timing=stats.timing(),
    )


@contextlib.contextmanager
def _leased_store(
    cfg: ExtractConfig, source: Source, refs: list[SampleRef], manifest: Manifest, bases: dict[str, Any]
) -> Iterator[fstore.StoreWriter]:
    """Create or reopen the store under this driver's lease (``fcache.store.lease.leased_store``); a new or replaced
    store gets the targets its source knows from metadata."""
    backend = open_backend(cfg.out, cfg.options())

    def make() -> fstore.StoreWriter:
        return fstore.create(backend, manifest, [r.key for r in refs], targets=source.target_specs(), target_attrs=source.target_attrs(),
                             overwrite=cfg.overwrite, bases=bases)  # fmt: skip

    with leased_store(backend, make) as (writer, existed):
        if not existed or cfg.overwrite:
            write_driver_targets(writer, source, refs)
        else:
            writer.tidy()  # a resumed store: what its killed writers left
        yield writer


@contextlib.contextmanager
def _progress_bar(total: int, stats: _Stats, t0: float, show: bool) -> Iterator[Callable[[int], None]]:
    """``progress(k)``: k more samples done; the bar shows samples, images/s and bytes written."""
    with tqdm(total=total, unit="sample", desc="extract", disable=not show, file=sys.stderr) as bar:

        def progress(k: int) -> None:
            bar.update(k)
            rate = stats.images / (stats.busy or max(time.perf_counter() - t0, 1e-9))  # busy: set when the pipeline ends
            bar.set_postfix(img_s=f"{rate:.2f}", written=human(stats.bytes), refresh=False)

        yield progress
        progress(0)  # the last units' images and bytes: counted once their writes finished, after their samples


def fstore_exists(location: str | Backend) -> bool:
    return open_backend(location).exists(ROOT_META)


@dataclass
class _Stats:
    images: int = 0
    bytes: int = 0
    busy: float = 0.0  # wall time of the pipeline (or of the cluster's tasks, from submission to the last result)
    loader_wait: float = 0.0  # waiting for decoded samples (cluster: summed over the units)
    forward: float = 0.0  # backbone forward, including the copy back to the host (cluster: summed)
    writer_wait: float = 0.0  # main thread waiting for the writer's queue (in process)
    write: float = 0.0  # encoding the shards and committing (cluster: summed over the units)

    def timing(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items() if k not in ("images", "bytes")}


def _on_cluster(cfg: ExtractConfig, target: ClusterTarget, source: Source, refs: list[SampleRef], pending: list[fstore.Unit],
                stats: _Stats, progress: Callable[[int], None]) -> None:  # fmt: skip
    """The pending units as dask tasks; the same stats and progress as in process."""
    from fcache.extract.executor import UnitOutcome, run_on_cluster, worker_job

    def done(out: UnitOutcome) -> None:
        stats.images += out.images
        stats.bytes += out.bytes
        stats.loader_wait += out.seconds.get("decode_wait", 0.0)
        stats.forward += out.seconds.get("forward", 0.0)
        stats.write += out.seconds.get("write", 0.0)
        progress(out.samples)

    t = time.perf_counter()
    try:
        run_on_cluster(target, worker_job(cfg, target, source), refs, pending, done)
    finally:
        stats.busy = time.perf_counter() - t


def _pipeline(cfg: ExtractConfig, source: Source, refs: list[SampleRef], backbone: Backbone, writer: fstore.StoreWriter,
              pending: list[fstore.Unit], stats: _Stats, progress: Callable[[int], None]) -> None:  # fmt: skip
    """Decode -> forward -> write, overlapped; raises the writer's error, if any, in the main thread."""
    m = writer.manifest
    indices = [i for u in pending for i in range(u.start, u.stop)]
    dataset = SampleDataset(source, refs, indices, m, timeout=cfg.source.decode_timeout)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None,
        pin_memory=cfg.device.startswith("cuda"),
        collate_fn=_as_is,
    )
    assembler = UnitAssembler(m, pending)
    batcher = Batcher(backbone, assembler, cfg.batch_size, writer.bases)
    writers = _Writers(writer, stats, cfg.writers or default_writers())
    t_start = time.perf_counter()
    try:
        for item in _timed(loader, stats):
            check_sample(item, cfg.on_error)
            batcher.add(item)
            _drain(assembler, writers, stats)
            stats.images, stats.forward = batcher.images, batcher.seconds
            progress(1)
        batcher.flush()
        stats.images, stats.forward = batcher.images, batcher.seconds
        _drain(assembler, writers, stats, final=True)
    finally:
        writers.close()
        stats.busy = time.perf_counter() - t_start
    writers.check()


def _as_is(item: Any) -> Any:
    return item


def _timed(loader: Any, stats: _Stats) -> Iterator[SampleItem]:
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stats.loader_wait += time.perf_counter() - t
        yield item


def _drain(assembler: UnitAssembler, writers: _Writers, stats: _Stats, final: bool = False) -> None:
    writers.check()
    for payload in assembler.ready():
        t = time.perf_counter()
        writers.put(payload)
        stats.writer_wait += time.perf_counter() - t
    if final and assembler.open_units():
        raise RuntimeError(f"extraction ended with incomplete units {assembler.open_units()}")


class _Writers:
    """Threads committing finished units (each unit owns its shard, so they never share a file).

    The first error stops the pool; the driver re-raises it. The queue holds two units per thread,
    which bounds the memory in flight.
    """

    def __init__(self, writer: fstore.StoreWriter, stats: _Stats, n: int) -> None:
        self.writer, self.stats = writer, stats
        self.inbox: queue.Queue = queue.Queue(maxsize=2 * n)
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"fcache-writer-{k}", daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def put(self, payload: Any) -> None:
        self.inbox.put(payload)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        for _ in self.threads:
            self.inbox.put(None)
        for t in self.threads:
            t.join()

    def _run(self) -> None:
        while (p := self.inbox.get()) is not None:
            if self.errors:
                continue  # keep draining so the driver never blocks on a full queue
            try:
                rec = self.writer.write_unit(p.unit, p.features, p.status, p.geometry, targets=p.targets, errors=p.errors)
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread
                self.errors.append(e)
                continue
            if rec:
                with self.lock:
                    self.stats.bytes += rec.bytes


def summary_lines(s: ExtractSummary) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.status_counts.items()))
    lines = [
        f"extracted {s.processed} of {s.samples} samples into {s.store} in {s.seconds:.1f}s ({s.images_per_s:.2f} images/s)",
        f"status: {counts}",
        f"written: {human(s.bytes_written)}, compression ratio {s.compression_ratio:.2f}",
    ]
    lines += [f"  {lv['name']}: {human(lv['bytes_per_sample'])}/sample on disk, ratio {lv['compression_ratio']:.2f}" for lv in s.levels]
    if s.exit_code:
        lines.append(f"some samples failed: see {s.store}/errors.jsonl")
    return lines
