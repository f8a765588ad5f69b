"""Where dask work runs: ``--cluster local[:N]`` (a LocalCluster set up for torch) or ``--scheduler ADDRESS``.

The one place fcache starts or joins a dask cluster, for extraction units and sweep variants alike. ``local:N``
starts a dask.distributed LocalCluster of N worker processes on loopback (no dashboard, so no other listening port);
with CUDA each worker gets its own GPU (worker k runs on ``cuda:k``). ``--scheduler`` joins a running cluster
(dask-jobqueue, Kubernetes, SLURM, ``dask scheduler`` + ``dask worker``); dask's own security settings apply
(``distributed.comm.tls.*`` in dask's config, or its ``client.security-loader``), fcache adds none. Parsing here is
dask-free; :func:`connect` imports dask only when a cluster is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fcache.common.errors import InputError

SCHEMES = ("tcp://", "tls://")
WORKER_WAIT_S = 60.0
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ClusterTarget:
    """A LocalCluster of ``local`` workers, or (local == 0) the running cluster at ``scheduler``."""

    local: int = 0
    scheduler: str = ""
    gpus: bool = False  # local workers pinned one per GPU
    threads_per_worker: int = 1  # dask threads (tasks at once) per local worker
    torch_threads: int = 0  # torch threads per local CPU worker; 0: the cores shared out

    def describe(self) -> str:
        return f"a local cluster of {self.local} workers" if self.local else f"the dask scheduler at {self.scheduler}"


def parse_target(
    cluster: str, scheduler: str, device: str = "cpu", *, threads_per_worker: int = 1, torch_threads: int = 0
) -> ClusterTarget | None:
    """The cluster asked for by ``--cluster`` / ``--scheduler``; None for an in-process run.

    ``local`` alone means one worker per GPU on CUDA, else one per 2 CPU cores.

    Raises:
        InputError: both flags, a malformed value, or more local workers than GPUs on CUDA.
    """
    if cluster and scheduler:
        raise InputError("--cluster and --scheduler exclude each other: start a local cluster or join a running one")
    if scheduler:
        if not scheduler.startswith(SCHEMES) or not scheduler.split("://", 1)[1]:
            raise InputError(f"--scheduler {scheduler}: give the address as tcp://HOST:PORT (or tls://HOST:PORT, TLS set in dask's config)")
        return ClusterTarget(scheduler=scheduler)
    if not cluster:
        return None
    kind, _, count = cluster.partition(":")
    if kind != "local" or (count and not count.isdigit()):
        raise InputError(f"--cluster {cluster}: use local:N (N worker processes) or local (one per GPU, or per 2 CPU cores)")
    cuda = device.startswith("cuda")
    gpus = _cuda_devices() if cuda else 0
    n = int(count) if count else (gpus if cuda else max(1, (os.cpu_count() or 2) // 2))
    if n < 1:
        raise InputError(f"--cluster {cluster}: needs at least one worker" + (" (no CUDA device is visible)" if cuda else ""))
    if cuda and device != "cuda":
        raise InputError(f"--device {device} with --cluster: use --device cuda, and each local worker gets its own GPU")
    if cuda and n > gpus:
        raise InputError(f"--cluster {cluster}: {n} workers but {gpus} visible GPU(s); use local:{gpus} (one worker per GPU)")
    return ClusterTarget(local=n, gpus=cuda, threads_per_worker=threads_per_worker, torch_threads=torch_threads)


def worker_device(device: str, target_gpus: bool, worker_name: Any) -> str:
    """The device a worker runs on: local worker k on ``cuda:k``; otherwise ``device`` as given."""
    return f"cuda:{int(worker_name)}" if target_gpus else device


def worker_threads(target: ClusterTarget) -> int:
    """Torch intra-op threads per local CPU worker (the cores shared out); 0 leaves a joined cluster's workers as they are."""
    if not target.local or target.gpus:
        return 0
    return target.torch_threads or max(1, (os.cpu_count() or 2) // target.local)


@contextlib.contextmanager
def connect(target: ClusterTarget) -> Iterator[Any]:
    """A ``distributed.Client`` on the target, closed (and a LocalCluster shut down) on exit.

    Raises:
        InputError: the scheduler cannot be reached, or no worker joined it within ``WORKER_WAIT_S``.
    """
    from distributed import Client

    if target.local:
        with local_cluster(target.local, target.threads_per_worker, worker_threads(target) or 1) as client:
            yield client
        return
    try:
        client = Client(target.scheduler, timeout=f"{WORKER_WAIT_S:.0f}s")
    except (OSError, TimeoutError) as e:
        raise InputError(
            f"cannot reach the dask scheduler at {target.scheduler} ({e}); check --scheduler and that the scheduler runs "
            "(TLS: set distributed.comm.tls.* in dask's config)"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except (OSError, TimeoutError):
            raise InputError(
                f"no dask worker joined the scheduler at {target.scheduler} within {WORKER_WAIT_S:.0f}s; "
                f"start some (e.g. `dask worker {target.scheduler}`) and rerun"
            ) from None
        yield client


@contextlib.contextmanager
def local_cluster(workers: int, threads_per_worker: int, torch_threads: int) -> Iterator[Any]:
    """A Client on a LocalCluster of ``workers`` processes on loopback (no dashboard), set up for torch.

    dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off glibc's adaptive mmap threshold:
    every large tensor is then mapped and unmapped afresh, and a SwinV2 forward on CPU ran 1.6x slower (measured
    here). Ours start without it, and with ``torch_threads`` OpenMP/BLAS threads instead of dask's 1. The nanny
    writes variables into this process's environment too; it is restored on exit.
    ``torch_threads`` wins over OMP_NUM_THREADS and the like set in this process's environment.
    """
    import dask
    from distributed import Client, LocalCluster

    environ = {"MALLOC_TRIM_THRESHOLD_": None} | {k: str(torch_threads) for k in THREAD_VARS}
    saved = dict(os.environ)
    _set_environ(environ)  # dask lets this process's variables override its config, and the workers inherit them
    try:
        with (
            dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()}),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=0,  # a worker holds one model and a few units; nothing to spill or pause
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:  # the nanny also leaves PYTHONHASHSEED and its own marker here
        os.environ.clear()
        os.environ.update(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
