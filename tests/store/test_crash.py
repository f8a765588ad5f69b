"""Crash safety with real processes: SIGKILL mid-unit, between write and commit, two writers on one unit."""

from __future__ import annotations

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
from helpers import decoded

SCRIPT = Path(__file__).with_name("writer_proc.py")


def run(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(store), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = run(path)
    assert r.returncode == 0, r.stderr
    return decoded(path)


def assert_same(path: Path, reference: dict[str, np.ndarray]) -> None:
    got = decoded(path)
    assert set(got) == set(reference)
    for k in reference:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


def assert_verifies(path: Path) -> None:
    r = CliRunner().invoke(main, ["verify", str(path)])
    assert r.exit_code == 0, r.output


def shard_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in (path / "features").rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("stage", ["delete", "level:p3", "samples"])
def test_sigkill_mid_unit_then_resume_equals_uninterrupted(tmp_path, reference, stage):
    path = tmp_path / "s.zarr"
    r = run(path, "--kill", f"2:{stage}")
    assert r.returncode == -signal.SIGKILL
    assert r.stdout.split() == ["0", "committed", "1", "committed"]
    assert set(fstore.open(path).ledger) == {0, 1}
    r = run(path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "committed", "3", "committed"]  # only the missing units
    assert_same(path, reference)
    assert_verifies(path)


def test_sigkill_from_outside_at_any_moment(tmp_path, reference):
    path = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path), "--slow", "0.05"], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list((path / "ledger" / "done").glob("*.json")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.12)  # inside the next unit's stages
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(fstore.open(path).ledger) < 4
    assert run(path).returncode == 0
    assert_same(path, reference)
    assert_verifies(path)


def test_killed_between_write_and_commit_redoes_unit_without_duplicates(tmp_path, reference):
    path = tmp_path / "s.zarr"
    r = run(path, "--kill", "1:commit")
    assert r.returncode == -signal.SIGKILL
    s = fstore.open(path)
    assert set(s.ledger) == {0}
    assert s.status[4:8].tolist() == [0, 0, 0, 0]  # written but uncommitted statuses read as pending
    report = fstore.verify(path)
    assert {p.kind for p in report.problems} == {"incomplete", "lock"}
    r = run(path)
    assert r.stdout.split() == ["1", "committed", "2", "committed", "3", "committed"]
    ledger = sorted(p.name for p in (path / "ledger" / "done").iterdir())
    assert ledger == ["000000.json", "000001.json", "000002.json", "000003.json"]
    assert len(shard_files(path)) == 4 * 4  # one shard file per level per unit, no duplicates
    assert layout.temporaries(path) == []
    assert_same(path, reference)
    assert_verifies(path)


@pytest.mark.slow
def test_two_processes_same_unit_exactly_one_commit(tmp_path, reference):
    path = tmp_path / "s.zarr"
    assert run(path, "--units", "").returncode == 0  # complete store to compare against...
    for p in (path / "ledger" / "done").glob("*.json"):
        p.unlink()  # ...then forget every commit so both writers start from scratch
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), str(path), "--units", "0", "--slow", "0.2"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[1] for o in outs) == ["committed", "skipped"]
    assert [p.name for p in (path / "ledger" / "done").iterdir()] == ["000000.json"]
    assert run(path).returncode == 0
    assert_same(path, reference)
    assert_verifies(path)


def test_leftover_temporary_is_reported_then_cleaned_by_resume(tmp_path, reference):
    path = tmp_path / "s.zarr"
    run(path, "--kill", "3:delete")
    shard = layout.shard_file(path, "features/p2", 3, 5)
    shard.parent.mkdir(parents=True, exist_ok=True)
    leftover = shard.with_name(shard.name + ".deadbeef.partial")
    leftover.write_bytes(b"half a shard")
    kinds = {p.kind for p in fstore.verify(path).problems}
    assert "temporary" in kinds
    assert run(path).returncode == 0
    assert not leftover.exists()
    assert_same(path, reference)
    assert_verifies(path)
