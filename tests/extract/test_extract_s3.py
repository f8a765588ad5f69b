"""`fcache extract --out s3://...` on a loopback S3 server: kill -9 at a random moment then rerun, a second driver,
and a dask cluster, each ending in the store an uninterrupted local run makes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.store import layout
from fcache.store.backends import open_backend
from fcache.store.lease import LEASE_KEY
from media import image_folder

FLAGS = ["--random-init", "--input-size", "64", "--shard-size", "2", "--batch-size", "3", "--device", "cpu", "--seed", "0"]


def decoded(location) -> dict[str, np.ndarray]:
    s = fstore.open(location)
    out = {"status": s.status, "geometry": s.geometry_array, "keys": s.keys.astype(str)}
    return out | {lv: np.stack([s.read(lv, int(i)) for i in s.ok_indices]) for lv in s.level_names}


def assert_same(location, ref: dict[str, np.ndarray]) -> None:
    got = decoded(location)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data"), n=9)  # 5 units of 2


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, np.ndarray]:
    """An uninterrupted extraction to local disk."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = CliRunner().invoke(main, ["extract", "--dataset", "folder", "--root", str(data), *FLAGS, "--num-workers", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return decoded(out)


def extract_cmd(data: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fcache", "extract", "--dataset", "folder", "--root", str(data), *FLAGS, "--num-workers", "0",
            "--out", out, *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_a_random_moment_then_rerun_equals_an_uninterrupted_local_run(data, reference, s3_bucket, seed):
    url = s3_bucket + "/s.zarr"
    backend = open_backend(url)
    proc = subprocess.Popen(extract_cmd(data, url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not backend.exists(LEASE_KEY) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the driver has started
    time.sleep(random.Random(seed).uniform(0.0, 4.0))  # anywhere from creating the store to committing units
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sum(rec.samples for rec in layout.read_ledger(backend).values())
    r = subprocess.run(extract_cmd(data, url, "--json"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["processed"] == 9 - done  # only the units the killed run had not committed
    assert_same(url, reference)
    assert CliRunner().invoke(main, ["verify", url]).exit_code == 0
    assert not backend.exists(LEASE_KEY) and not backend.listing("ledger/lock")  # the dead driver's lease was taken over, then released


@pytest.mark.slow
def test_second_driver_is_refused_on_s3(data, s3_bucket):
    url = s3_bucket + "/s.zarr"
    hold = f"from fcache.store.lease import DriverLease; DriverLease({url!r}).acquire(); print('held', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    args = ["extract", "--dataset", "folder", "--root", str(data), *FLAGS, "--num-workers", "0", "--limit", "2", "--out", url]
    try:
        assert holder.stdout.readline().strip() == "held"
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2
        line = r.output.strip()
        assert "\n" not in line and f"pid {holder.pid}" in line and "another driver" in line
        assert not open_backend(url).exists("zarr.json")  # nothing was created under another driver's lease
    finally:
        holder.kill()
        holder.wait()
    r = CliRunner().invoke(main, [*args, "--json"])  # the dead holder's lease is stale: taken over
    assert r.exit_code == 0, r.output
    assert len(fstore.open(url).ledger) == 1 and not open_backend(url).exists(LEASE_KEY)
    r = CliRunner().invoke(main, [*args, "--dtype", "bf16"])
    assert r.exit_code == 2 and 'storage.dtype: "fp16" != "bf16"' in r.output  # another configuration: refused, named
    r = CliRunner().invoke(main, [*args, "--dtype", "bf16", "--overwrite", "--json"])
    assert r.exit_code == 0, r.output
    s = fstore.open(url)
    assert s.manifest.storage.dtype == "bf16" and len(s.ledger) == 1 and fstore.verify(url).ok


@pytest.mark.slow
def test_local_cluster_into_s3_equals_in_process(data, reference, s3_bucket, monkeypatch):
    from fcache.common.cluster import THREAD_VARS

    for k in ("MALLOC_TRIM_THRESHOLD_", *THREAD_VARS):  # dask's nanny writes them into this process: restore them after
        monkeypatch.setenv(k, os.environ[k]) if k in os.environ else monkeypatch.delenv(k, raising=False)
    url = s3_bucket + "/s.zarr"
    r = CliRunner().invoke(main, ["extract", "--dataset", "folder", "--root", str(data), *FLAGS, "--num-workers", "1", "--out", url,
                                  "--cluster", "local:2", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["processed"] == 9
    assert_same(url, reference)
    assert CliRunner().invoke(main, ["verify", url]).exit_code == 0
    assert {rec.pid for rec in fstore.open(url).ledger.values()} != {os.getpid()}  # the workers committed the units
