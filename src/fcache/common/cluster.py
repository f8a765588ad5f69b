"""A dask LocalCluster set up for torch work (extraction units, sweep variants): the one place fcache starts one.

dask.distributed's LocalCluster with its worker environment fixed for torch on CPU; see :func:`local_cluster`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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
