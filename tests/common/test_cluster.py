"""fcache's LocalCluster: workers start without dask's MALLOC_TRIM_THRESHOLD_ (it slows torch's CPU kernels) and with
the torch threads asked for, and this process's environment is left as it was."""

from __future__ import annotations

import os

from fcache.common.cluster import THREAD_VARS, local_cluster


def worker_environment() -> dict[str, str | None]:
    import torch

    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", *THREAD_VARS)} | {"torch": str(torch.get_num_threads())}


def test_workers_start_without_malloc_trim_and_with_the_threads_asked(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as a plain dask cluster leaves it in this process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = dict(os.environ)
    with local_cluster(2, threads_per_worker=1, torch_threads=2) as client:
        envs = client.run(worker_environment)
    assert len(envs) == 2
    for env in envs.values():
        assert env == {"MALLOC_TRIM_THRESHOLD_": None, **dict.fromkeys(THREAD_VARS, "2"), "torch": "2"}
    assert dict(os.environ) == before
