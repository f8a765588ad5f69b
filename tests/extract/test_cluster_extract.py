"""Distributed extraction with real processes: dask LocalCluster workers, a SIGKILLed worker, decode timeouts, the lease."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hanging import HangingFolder

from fcache import store as fstore
from fcache.cli import main
from fcache.common.cluster import THREAD_VARS, ClusterTarget, parse_target, worker_device
from fcache.extract import driver as runner
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract
from fcache.extract.isolate import DecodePool
from fcache.extract.stages import load_sample
from fcache.spec import Status
from fcache.store import layout
from fcache.store.lease import DriverLease, is_stale
from media import image_folder

BASE = dict(model="swinv2-t", random_init=True, input_size=64, shard_size=2, batch_size=3, num_workers=1, decode_timeout=1.0, seed=0)
FLAGS = ["--random-init", "--input-size", "64", "--shard-size", "2", "--batch-size", "3", "--num-workers", "1", "--device", "cpu"]
FLAGS += ["--decode-timeout", "1"]


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig.from_flags(**{**BASE, **kw})


def use_source(monkeypatch, delay: float = 0.0) -> None:
    """The driver builds the misbehaving source; it travels to workers and decode processes by pickle."""
    monkeypatch.setattr(runner, "build_source", lambda c: HangingFolder(c.root, delay=delay))


def decoded(path: Path) -> dict[str, np.ndarray]:
    s = fstore.open(path)
    out = {"status": s.status, "geometry": s.geometry_array, "keys": s.keys.astype(str)}
    return out | {lv: np.asarray(s.to_dask(lv).compute()) for lv in s.level_names}


def assert_same_store(path: Path, ref: dict[str, np.ndarray]) -> None:
    got = decoded(path)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """7 real photos and one whose decoding hangs (4 units of 2)."""
    root = image_folder(tmp_path_factory.mktemp("data"), n=7)
    shutil.copy(root / "cats" / "img0.jpg", root / "dogs" / "hang.jpg")
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, np.ndarray]:
    """The in-process store (SIGALRM on the main thread times the hanging sample out)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    with pytest.MonkeyPatch.context() as mp:
        use_source(mp)
        s = run_extract(cfg(dataset="folder", root=str(data), out=str(out), num_workers=0))
    assert s.status_counts == {"ok": 7, "timeout": 1}
    return decoded(out)


def test_decode_pool_costs_one_sample_per_poisonous_file(tmp_path):
    root = image_folder(tmp_path / "data", n=2)
    for bad in ("hang", "stuck", "crash"):
        shutil.copy(root / "cats" / "img0.jpg", root / "dogs" / f"{bad}.jpg")
    source = HangingFolder(root)
    refs = source.samples()  # cats/img0, dogs/crash, dogs/hang, dogs/img1, dogs/stuck
    manifest = runner.prepare(cfg(dataset="folder", root=str(root), out="unused"))[3]
    pool = DecodePool(source, manifest, processes=2, timeout=1.0, grace=1.0)
    try:
        items = list(pool.map(list(enumerate(refs))))
        assert [it.key for it in items] == [r.key for r in refs]  # in the order asked
        got = {it.key: (Status(it.status), it.message) for it in items}
        assert got["cats/img0.jpg"][0] == got["dogs/img1.jpg"][0] == Status.OK
        assert got["dogs/hang.jpg"][0] == Status.TIMEOUT and "longer than 1s" in got["dogs/hang.jpg"][1]  # SIGALRM in the child
        assert got["dogs/stuck.jpg"][0] == Status.TIMEOUT and "was killed" in got["dogs/stuck.jpg"][1]  # only a kill ends it
        assert got["dogs/crash.jpg"][0] == Status.DECODE_ERROR and "died" in got["dogs/crash.jpg"][1]
        assert pool.restarts == 2
        want = load_sample(source, refs[0], 0, manifest)  # the same item as decoded in process
        np.testing.assert_array_equal(items[0].pixels.numpy(), want.pixels.numpy())
        np.testing.assert_array_equal(items[0].geometry, want.geometry)
        again = list(pool.map([(3, refs[3])]))  # the pool still works
        assert again[0].status == Status.OK and again[0].index == 3
    finally:
        pool.close()


@pytest.mark.slow
def test_local_cluster_store_equals_in_process(tmp_path, data, reference, monkeypatch):
    use_source(monkeypatch)
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["extract", "--dataset", "folder", "--root", str(data), *FLAGS, "--out", str(out), "--cluster", "local:2",
                                  "--json"])  # fmt: skip
    assert r.exit_code == 3, r.output  # the hanging sample was skipped
    summary = json.loads(r.stdout)
    assert summary["processed"] == 8 and summary["status_counts"] == {"ok": 7, "timeout": 1}
    assert_same_store(out, reference)
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], e["status"]) for e in errors] == [("dogs/hang.jpg", "timeout")]
    assert not (out / "ledger" / "driver.lease").exists()  # released


@pytest.mark.slow
def test_killed_worker_is_retried_and_store_equals_in_process(tmp_path, data, reference, monkeypatch):
    import psutil
    from distributed import Client, LocalCluster

    for k in ("MALLOC_TRIM_THRESHOLD_", *THREAD_VARS):  # dask's nanny writes them into this process: restore them after
        monkeypatch.setenv(k, os.environ[k]) if k in os.environ else monkeypatch.delenv(k, raising=False)
    use_source(monkeypatch, delay=0.6)  # slow units, so the kill lands inside one
    out = tmp_path / "s.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None, memory_limit=0) as cluster, Client(cluster) as client:
        result: dict = {}
        driver = threading.Thread(target=lambda: result.update(s=run_extract(cfg(dataset="folder", root=str(data), out=str(out),
                                                                                     scheduler=cluster.scheduler_address))))  # fmt: skip
        driver.start()
        done = out / "ledger" / "done"
        deadline = time.time() + 120
        while not (done.is_dir() and any(done.iterdir())) and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads((out / "ledger" / "driver.lease").read_text())["pid"] == os.getpid()  # the driver holds the lease
        pids = client.run(os.getpid)
        children = {w: psutil.Process(pid).children() for w, pid in pids.items()}  # their decode processes
        running: dict = {}  # worker -> units it is running that are not committed yet
        while not running and time.time() < deadline:
            committed_before = set(layout.read_ledger(out))
            running = {w: ks for w, keys in client.processing().items() if (ks := {unit_of(k) for k in keys} - committed_before)}
        victim = next(iter(running))
        os.kill(pids[victim], signal.SIGKILL)
        unfinished = running[victim] - set(layout.read_ledger(out))  # not those it committed before it died
        driver.join(timeout=180)
        assert not driver.is_alive() and "s" in result
    assert result["s"].exit_code == 3 and result["s"].status_counts == {"ok": 7, "timeout": 1}
    ledger = fstore.open(out).ledger
    assert set(ledger) == {0, 1, 2, 3}
    assert unfinished and all(ledger[u].pid != pids[victim] for u in unfinished)  # the dead worker's units, finished by another
    assert_same_store(out, reference)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert layout.temporaries(out) == [] and not list((out / "ledger" / "lock").iterdir())
    time.sleep(1.0)
    assert children[victim] and not [c for c in children[victim] if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # no orphans


def unit_of(key: object) -> int:
    return int(str(key).split("-")[2])  # fcache-unit-<unit>-<token>


def test_second_driver_is_refused_then_a_dead_drivers_lease_is_taken_over(tmp_path, data):
    out = tmp_path / "s.zarr"
    run_extract(cfg(dataset="folder", root=str(data), out=str(out), num_workers=0, limit=2))
    argv = ["fcache", "extract", "--dataset", "folder", "--root", "/data/" + "deep/" * 60 + "images", "--out", "/stores/my run.zarr"]
    hold = (
        f"import sys; sys.argv = {argv!r}; from fcache.store.lease import DriverLease; "
        f"DriverLease({str(out)!r}).acquire(); print('held', flush=True); input()"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["extract", "--dataset", "folder", "--root", str(data), *FLAGS, "--num-workers", "0", "--limit", "2", "--out", str(out)]
        r = CliRunner().invoke(main, [*args, "--dtype", "bf16", "--overwrite"])
        assert r.exit_code == 2
        line = r.output.strip()
        assert "\n" not in line and f"pid {holder.pid}" in line and "another driver" in line and "wait for it" in line
        assert "(fcache extract --dataset folder --root /data/deep/" in line and " ... " in line  # the holder's command, whole
        assert "--out '/stores/my run.zarr'" in line and len(line) < 600
        assert fstore.open(out).manifest.storage.dtype == "fp16" and len(fstore.open(out).ledger) == 1  # nothing replaced
    finally:
        holder.kill()
        holder.wait()
    r = CliRunner().invoke(main, [*args, "--dtype", "bf16", "--overwrite", "--json"])  # the dead holder's lease is stale
    assert r.exit_code == 0, r.output
    assert fstore.open(out).manifest.storage.dtype == "bf16"
    assert not (out / "ledger" / "driver.lease").exists()


def test_lease_staleness_rules(tmp_path):
    import socket

    alive = {"host": socket.gethostname(), "pid": os.getpid()}
    assert not is_stale(alive, age=1e6)  # a live driver on this host keeps it, however long it runs
    assert is_stale({**alive, "pid_start": "0"}, age=0)  # the pid now belongs to another process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    assert is_stale({**alive, "pid": int(dead)}, age=0)
    assert not is_stale({"host": "elsewhere", "pid": 1}, age=60) and is_stale({"host": "elsewhere", "pid": 1}, age=7200)
    (tmp_path / "ledger").mkdir()
    a, b = DriverLease(tmp_path), DriverLease(tmp_path)
    with a:
        a.acquire()  # idempotent for its holder
        with pytest.raises(fstore.StoreError, match="another driver"):
            b.acquire()
    b.acquire()
    b.release()
    assert not (tmp_path / "ledger" / "driver.lease").exists()


def test_cluster_flags(tmp_path, data):
    base = ["extract", "--dataset", "folder", "--root", str(data), "--random-init", "--out", str(tmp_path / "x.zarr"), "--device", "cpu"]
    cases = [
        (["--cluster", "local:0"], "at least one worker"),
        (["--cluster", "remote:4"], "use local:N"),
        (["--cluster", "local:2", "--scheduler", "tcp://127.0.0.1:8786"], "exclude each other"),
        (["--scheduler", "http://127.0.0.1:8786"], "tcp://HOST:PORT"),
    ]
    for extra, msg in cases:
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (extra, r.output)
    assert not (tmp_path / "x.zarr").exists()
    assert parse_target("local:3", "", "cpu") == ClusterTarget(local=3)
    assert parse_target("", "tls://10.0.0.1:8786", "cuda") == ClusterTarget(scheduler="tls://10.0.0.1:8786")
    assert parse_target("", "", "cpu") is None
    assert [worker_device("cuda", True, k) for k in (0, 1)] == ["cuda:0", "cuda:1"] and worker_device("cuda", False, 1) == "cuda"
