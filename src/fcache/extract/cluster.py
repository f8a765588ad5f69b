"""Where the workers of a distributed extraction come from: ``--cluster local[:N]`` or ``--scheduler ADDRESS``.

``local:N`` starts a dask.distributed LocalCluster of N worker processes on loopback (no dashboard, so no other
listening port); with CUDA each worker gets its own GPU (worker k runs on ``cuda:k``). ``--scheduler`` joins a
running cluster (dask-jobqueue, Kubernetes, SLURM, ``dask scheduler`` + ``dask worker``); dask's own security
settings apply (``distributed.comm.tls.*`` in dask's config, or its ``client.security-loader``), fcache adds none.
Parsing here is dask-free; ``connect`` imports dask only when a cluster is used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fcache.common.errors import InputError

SCHEMES = ("tcp://", "tls://")
WORKER_WAIT_S = 60.0
THREADS_PER_WORKER = 2  # one unit decodes + runs the backbone while the previous one is written


@dataclass(frozen=True)
class ClusterTarget:
    """A LocalCluster of ``local`` workers, or (local == 0) the running cluster at ``scheduler``."""

    local: int = 0
    scheduler: str = ""
    gpus: bool = False  # local workers pinned one per GPU

    def describe(self) -> str:
        return f"a local cluster of {self.local} workers" if self.local else f"the dask scheduler at {self.scheduler}"


def parse_target(cluster: str, scheduler: str, device: str) -> ClusterTarget | None:
    """The cluster asked for by ``--cluster`` / ``--scheduler``; None for an in-process run.

    Raises:
        ValueError: both flags, a malformed value, or more local workers than GPUs on CUDA.
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
    return ClusterTarget(local=n, gpus=cuda)


def worker_device(device: str, target_gpus: bool, worker_name: Any) -> str:
    """The device a worker runs the backbone on: local worker k on ``cuda:k``; otherwise ``device`` as given."""
    return f"cuda:{int(worker_name)}" if target_gpus else device


def worker_threads(target: ClusterTarget) -> int:
    """Torch intra-op threads per local CPU worker (the cores shared out); 0 leaves a joined cluster's workers as they are."""
    if not target.local or target.gpus:
        return 0
    return max(1, (os.cpu_count() or 2) // target.local)


@contextlib.contextmanager
def connect(target: ClusterTarget) -> Iterator[Any]:
    """A ``distributed.Client`` on the target, closed (and a LocalCluster shut down) on exit.

    Raises:
        ValueError: the scheduler cannot be reached, or no worker joined it within ``WORKER_WAIT_S``.
    """
    from distributed import Client

    from fcache.common.cluster import local_cluster

    if target.local:
        with local_cluster(target.local, THREADS_PER_WORKER, worker_threads(target) or 1) as client:
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


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
