"""The dask executor of ``fcache extract --cluster / --scheduler``: one task per unit (shard), with retries.

The driver has created the store; every task decodes its unit's samples (``DecodePool``: child processes with a
per-sample deadline), runs the backbone (built once per worker process and kept by the ``UnitWorkers`` plugin),
encodes and commits the unit itself with ``StoreWriter.write_unit``: one writer per shard, always. A task for a
unit already in the ledger returns at once, so the re-run of a task whose worker was lost after its commit is
free. Results stream back to the driver as units finish. Workers never create arrays or set attributes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from distributed import WorkerPlugin, as_completed, get_worker

from fcache.common.cluster import ClusterTarget, connect, worker_device, worker_threads
from fcache.common.errors import FcacheError, InputError, SampleFailed, StoreError
from fcache.extract.backbones import Backbone
from fcache.extract.isolate import DecodePool
from fcache.extract.rebuild import backbone_of
from fcache.extract.sources.base import SampleRef, Source
from fcache.extract.stages import Batcher, SampleItem, UnitAssembler, check_sample
from fcache.store import StoreWriter, Unit, layout
from fcache.store.backends import ROOT_META, is_url, open_backend
from fcache.store.records import LedgerRecord

if TYPE_CHECKING:
    from fcache.extract.config import ExtractConfig

RETRIES = 2  # a task that raises runs at most twice more; one whose worker died is rescheduled by dask itself
UNITS_PER_WORKER = 2  # units in flight in one worker process (bounds its memory whatever its thread count)


@dataclass(frozen=True)
class WorkerJob:
    """What every worker needs to run units; travels once per worker (inside the plugin), not with every task."""

    store: str  # a path every worker mounts, or a URL
    storage_options: dict[str, Any]
    source: Source
    weights: str
    device: str
    pin_gpus: bool  # LocalCluster worker k runs on cuda:k
    torch_threads: int  # 0: leave the worker's setting
    batch_size: int
    decode_processes: int
    decode_timeout: float
    on_error: str
    attention: str = "sdpa"


@dataclass
class UnitOutcome:
    """What one unit task reports back: counts, timings, and a failure that retrying cannot fix."""

    unit: int
    samples: int
    images: int = 0
    bytes: int = 0
    committed: bool = False  # by this task (False: it was in the ledger already, or another writer held its lock)
    seconds: dict[str, float] = field(default_factory=dict)  # decode_wait, forward, write
    failed: str = ""  # --on-error fail: the first failed sample
    error: BaseException | None = None  # deterministic (bad weights, fp16 overflow, disk full): stop the run


class UnitWorkers(WorkerPlugin):
    """Per worker process: the frozen backbone (built on first use) and one decode pool shared by its unit tasks."""

    def __init__(self, job: WorkerJob, name: str) -> None:
        self.job, self.name = job, name

    def setup(self, worker: Any) -> None:
        self.device = worker_device(self.job.device, self.job.pin_gpus, worker.name)
        self.slots = threading.Semaphore(UNITS_PER_WORKER)
        self._lock, self._build_lock, self._pool_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._writer: StoreWriter | None = None
        self._backbone: Backbone | None = None
        self._pool: DecodePool | None = None

    @property
    def writer(self) -> StoreWriter:
        """The store, as this worker sees it (on a filesystem every worker mounts at the same path, or in object storage)."""
        with self._lock:
            if self._writer is None:
                backend = open_backend(self.job.store, self.job.storage_options)
                if not backend.exists(ROOT_META):
                    raise StoreError(
                        f"worker {socket.gethostname()} cannot see the store {self.job.store}: put it in object storage "
                        "or on a filesystem that every worker mounts at the same path"
                    )
                self._writer = StoreWriter(backend)
            return self._writer

    def teardown(self, worker: Any) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.close()  # type: ignore[union-attr]

    def backbone(self) -> Backbone:
        """Built once per worker process, checked against the store's manifest (same weights everywhere)."""
        manifest = self.writer.manifest
        with self._build_lock:
            if self._backbone is None:
                if self.job.torch_threads:
                    torch.set_num_threads(self.job.torch_threads)
                if self.device.startswith("cuda:"):
                    torch.cuda.set_device(self.device)  # this worker's GPU is also its current device
                bb = backbone_of(manifest, weights=self.job.weights, device=self.device, attention=self.job.attention)
                if bb.info.to_dict() != manifest.backbone.to_dict():
                    raise InputError(f"worker {socket.gethostname()} built another backbone than the store's; give it the same --weights")
                self._backbone = bb
            return self._backbone

    def pool(self) -> DecodePool:
        """The worker's decode processes, started on first use (they start in the background)."""
        manifest = self.writer.manifest
        with self._lock:
            if self._pool is None:
                j = self.job
                self._pool = DecodePool(j.source, manifest, processes=j.decode_processes, timeout=j.decode_timeout)
            return self._pool

    def decode(self, jobs: Sequence[tuple[int, SampleRef]]) -> Iterator[SampleItem]:
        """Items of ``jobs`` decoded in the worker's pool (one unit at a time; the next waits for this one's decoding only)."""
        pool = self.pool()
        with self._pool_lock:
            yield from pool.map(jobs)


def run_unit(plugin: str, unit: Unit, refs: list[SampleRef]) -> UnitOutcome:
    """The dask task of one unit: decode, forward, encode, commit. Idempotent: a committed unit returns at once."""
    workers = cast(UnitWorkers, get_worker().plugins[plugin])
    try:
        backend = workers.writer.backend
        done = backend.get(layout.done_key(unit))
        if done is not None:  # committed by an earlier try whose worker was lost before it reported
            rec = LedgerRecord.from_dict(json.loads(done), where=f"ledger record {backend.where(layout.done_key(unit))}")
            return UnitOutcome(unit.index, len(unit), bytes=rec.bytes)
        with workers.slots:
            return _extract_unit(workers, unit, refs)
    except (FcacheError, ValueError) as e:  # deterministic: a retry would fail alike
        return UnitOutcome(unit.index, len(unit), error=e)


def _extract_unit(workers: UnitWorkers, unit: Unit, refs: list[SampleRef]) -> UnitOutcome:
    writer, job = workers.writer, workers.job
    if job.torch_threads:  # OpenMP's thread count is per calling thread, and dask runs each task in one of its own
        torch.set_num_threads(job.torch_threads)
    workers.pool()  # decode processes start while the backbone is built
    assembler = UnitAssembler(writer.manifest, [unit])
    batcher = Batcher(workers.backbone(), assembler, job.batch_size, writer.bases)
    decode_wait, t = 0.0, time.perf_counter()
    items = workers.decode([(unit.start + j, ref) for j, ref in enumerate(refs)])
    try:
        for item in items:
            decode_wait += time.perf_counter() - t
            try:
                check_sample(item, job.on_error)
            except SampleFailed as e:
                return UnitOutcome(unit.index, len(unit), failed=str(e))
            batcher.add(item)
            t = time.perf_counter()
    finally:
        items.close()  # type: ignore[attr-defined]
    batcher.flush()
    (p,) = assembler.ready()
    t = time.perf_counter()
    rec = writer.write_unit(p.unit, p.features, p.status, p.geometry, targets=p.targets, errors=p.errors)
    seconds = {"decode_wait": decode_wait, "forward": batcher.seconds, "write": time.perf_counter() - t}
    size = rec.bytes if rec else 0
    return UnitOutcome(unit.index, len(unit), images=batcher.images, bytes=size, committed=rec is not None, seconds=seconds)


def worker_job(cfg: ExtractConfig, target: ClusterTarget, source: Source) -> WorkerJob:
    """The WorkerJob of an ExtractConfig (``--num-workers`` = decode processes per worker, at least one)."""
    return WorkerJob(
        store=cfg.out if is_url(cfg.out) else os.path.abspath(cfg.out),
        storage_options=cfg.options(),
        source=source,
        weights=os.path.abspath(cfg.weights) if cfg.weights else "",
        device=cfg.device,
        pin_gpus=target.gpus,
        torch_threads=worker_threads(target),
        batch_size=cfg.batch_size,
        decode_processes=max(1, cfg.num_workers),
        decode_timeout=cfg.source.decode_timeout,
        on_error=cfg.on_error,
        attention=cfg.attention,
    )


def run_on_cluster(
    target: ClusterTarget, job: WorkerJob, refs: list[SampleRef], pending: list[Unit], done: Callable[[UnitOutcome], None]
) -> None:
    """Run the pending units as dask tasks on ``target``; ``done`` is called in the driver as each one finishes.

    Raises:
        SampleFailed: ``--on-error fail`` and a sample failed (the other tasks are cancelled, committed units kept).
        RuntimeError: a unit kept failing after its retries (or kept killing its workers).
    """
    token = os.urandom(4).hex()
    plugin = UnitWorkers(job, name=f"fcache-extract-{token}")
    with connect(target) as client:
        client.register_plugin(plugin)
        try:
            futures = {
                client.submit(run_unit, plugin.name, u, refs[u.start : u.stop], key=f"fcache-unit-{u.name}-{token}", retries=RETRIES,
                              pure=False): u
                for u in pending
            }  # fmt: skip
            for fut in as_completed(list(futures)):
                try:
                    outcome = fut.result()
                except Exception as e:
                    u = futures[fut]
                    raise RuntimeError(
                        f"unit {u.name} (samples {u.start}-{u.stop - 1}) failed on {target.describe()} after {RETRIES} retries: "
                        f"{type(e).__name__}: {e}; committed units are kept, rerun the same command to resume"
                    ) from e
                if outcome.error is not None or outcome.failed:
                    client.cancel(list(futures))
                    raise outcome.error or SampleFailed(outcome.failed)
                done(outcome)
        finally:
            with contextlib.suppress(Exception):  # the cluster may already be gone
                client.unregister_worker_plugin(plugin.name)  # frees the backbone and decode processes of joined workers
