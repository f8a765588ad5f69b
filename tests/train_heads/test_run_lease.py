"""The RUN lease: a second `train-head` into a RUN folder that another process trains is refused naming the holder
(two processes); the lease of a killed run is taken over; `fcache runs` reads it; several heads refused together leave
no folder behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from clshelpers import build_label_store

from fcache.cli import main
from fcache.train_heads.analysis.runs import run_status
from fcache.train_heads.runlease import LEASE, RunLease
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")


def args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train-head", "--store", str(store), "--out", str(out), "--task", "classification", "--head", "linear",
            "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--logger", "none", *extra]  # fmt: skip


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pt"))


@pytest.mark.slow  # two processes training
def test_a_second_process_is_refused_and_a_killed_runs_lease_is_taken_over(tmp_path):
    store = build_label_store(tmp_path / "labels.zarr")
    out = tmp_path / "run"
    long = args(store, out, "--iters", "100000", "--checkpoint-every", "5", "--log-every", "1")
    holder = subprocess.Popen([sys.executable, "-m", "fcache", *long], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(checkpoints(out)) > 0)
        r = CliRunner().invoke(main, [*long, "--resume", "--stop-at", "1"])
        refused(r, f"{out} is being trained by another process (fcache train-head --store {store}", f"pid {holder.pid} on ")
        status = run_status(out)
        assert status["status"] == "running" and status["process"]["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert (out / LEASE).is_file() and run_status(out)["status"] == "stopped"  # killed: its lease is left, and stale
    last = checkpoints(out)[-1]
    r = CliRunner().invoke(main, [*long, "--resume", "--stop-at", str(last + 2), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["iters"] == {"start": last, "stop": last + 2, "total": 100000}
    assert not (out / LEASE).exists()  # released at the end


def test_heads_refused_for_a_held_folder_leave_no_folder_behind(tmp_path):
    store = build_label_store(tmp_path / "labels.zarr", n=8)
    out = tmp_path / "runs"
    with RunLease(out / "linear_dropout-0.5") as held:  # another training holds the second head's folder
        r = CliRunner().invoke(main, args(store, out, "--iters", "1", "--head", "linear:dropout=0.5"))
        refused(r, f"{out / 'linear_dropout-0.5'} is being trained by another process")
        assert sorted(p.name for p in out.iterdir()) == ["linear_dropout-0.5"]
        assert held.lease.held()
    assert not out.exists()  # the folders the lease made, left empty, went with it
