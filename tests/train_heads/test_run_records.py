"""A RUN folder's records (config.json, metrics.jsonl, checkpoint-<iter>.pt, model.safetensors) that are garbage, cut or
hostile are refused in one line naming the file, never with a traceback; an atomic write that fails leaves nothing;
a RUN folder of an earlier fcache (checkpoint.pt, ``steps`` in config.json) resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fcache.cli import main
from fcache.train_heads.checkpoints import CHECKPOINT, MODEL, OLD_CHECKPOINT
from fcache.train_heads.metricslog import METRICS, METRICS_CSV
from fcache.train_heads.runfolder import CONFIG
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = "fpn:channels=8,rois=8,rpn_batch=8"
AT1, AT3 = CHECKPOINT.format(iteration=1), CHECKPOINT.format(iteration=3)  # the fixture's checkpoint, the resumed run's


def train(det_store, out: Path, *extra: str):
    args = ["train-head", "--store", str(det_store), "--head", HEAD, "--iters", "3", "--batch-size", "1", "--warmup", "0"]
    args += ["--num-workers", "0", "--device", "cpu", "--out", str(out), "--json", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def run(det_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("records") / "run"
    r = train(det_store, out, "--stop-at", "1")  # the tests resume it
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


CONFIGS = {
    "not json": ("{", "is not valid JSON"),
    "a list": ("[1]", "the document is a list of 1, not a JSON object"),
    "empty": ("{}", "the field 'config' is missing"),
    "deep": ("[" * 50_000 + "]" * 50_000, "nested 50000 levels deep"),
    "wrong type": ('{"config": {"store": 5}}', "the field 'config.store' is 5 (a number), not a string"),
}


@pytest.mark.parametrize("what", sorted(CONFIGS))
def test_a_garbage_config_is_one_line(what, copy, det_store):
    text, fragment = CONFIGS[what]
    (copy / CONFIG).write_text(text)
    refused(CliRunner().invoke(main, ["eval", str(copy), "--store", str(det_store), "--device", "cpu"]), str(copy / CONFIG), fragment)
    refused(CliRunner().invoke(main, ["report", str(copy), "--out", str(copy.parent / "rep")]), fragment)


def test_a_garbage_metrics_line_is_one_line(copy):
    with open(copy / METRICS, "a") as f:
        f.write("[1, 2]\n")
    refused(
        CliRunner().invoke(main, ["report", str(copy), "--out", str(copy.parent / "rep")]), f"{copy / METRICS}, line", "not a JSON object"
    )


CHECKPOINTS = {
    "cut": lambda p: p.write_bytes(p.read_bytes()[:1000]),
    "garbage": lambda p: p.write_bytes(b"\x00garbage" * 100),
    "pickle": lambda p: p.write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"."),
}


@pytest.mark.parametrize("what", sorted(CHECKPOINTS))
def test_a_damaged_checkpoint_or_model_is_one_line(what, copy, det_store):
    CHECKPOINTS[what](copy / AT1)
    r = train(det_store, copy, "--resume")
    refused(r, str(copy / AT1))
    assert "weights_only" not in r.output and "Re-running" not in r.output
    CHECKPOINTS[what](copy / MODEL)
    r = CliRunner().invoke(main, ["eval", str(copy), "--store", str(det_store), "--device", "cpu"])
    refused(r, str(copy / MODEL))


def test_a_failed_checkpoint_write_leaves_no_temporary_and_says_disk_full(copy, det_store, monkeypatch):
    def full(obj, f, *a, **kw):
        Path(f).write_bytes(b"x" * 1000)  # torch writes part of the file, then the disk is full
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 4224 vs 4112: PytorchStreamWriter failed writing file"
        )

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))  # type: ignore[attr-defined]
    r = train(det_store, copy, "--resume")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines()[-1] == f"Error: disk full ({copy / AT3}): free some space and rerun with --resume"
    assert not list(copy.glob("*.partial"))


def test_stale_temporaries_of_a_run_are_removed_by_the_next(copy, det_store):
    (copy / f".{AT1}.99999.partial").write_bytes(b"half a checkpoint")
    (copy / f".{METRICS_CSV}.99999.partial").write_bytes(b"half a table")
    r = train(det_store, copy, "--resume")
    assert r.exit_code == 0, r.output
    assert not list(copy.glob("*.partial"))


def test_ctrl_c_says_what_was_kept_and_how_to_continue(det_store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train-head", "--store", str(det_store), "--head", HEAD, "--iters", "100000", "--batch-size", "1", "--warmup", "0"]
    args += ["--num-workers", "0", "--device", "cpu", "--checkpoint-every", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fcache", *args], stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(out.glob("checkpoint-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted: stopped at iteration ") and "Traceback" not in err
    assert f"{out}/checkpoint-" in last and last.endswith("--out " + str(out) + " --resume")
    kept = int(last.split("(iteration ")[1].split(")")[0])
    assert f"{out / CHECKPOINT.format(iteration=kept)} (iteration {kept})" in last
    assert kept >= 2 and kept % 2 == 0 and torch.load(out / CHECKPOINT.format(iteration=kept), weights_only=True)["iteration"] == kept
    assert [p.name for p in out.glob("checkpoint-*.pt")] == [CHECKPOINT.format(iteration=kept)]  # --keep-last 1


def test_a_run_of_an_earlier_fcache_resumes(copy, det_store, tmp_path):
    """checkpoint.pt instead of checkpoint-<iter>.pt, the lr milestones under ``steps``: resumed as if written today."""
    (copy / AT1).rename(copy / OLD_CHECKPOINT)
    record = json.loads((copy / CONFIG).read_text())
    record["config"]["steps"] = record["config"].pop("lr_steps")
    record.pop("host")
    (copy / CONFIG).write_text(json.dumps(record))
    r = train(det_store, copy, "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["iters"] == {"start": 1, "stop": 3, "total": 3}
    assert sorted(p.name for p in copy.glob("checkpoint*.pt")) == [AT3]
    straight = train(det_store, tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    a, b = (torch.load(run / AT3, weights_only=True)["model"] for run in (copy, tmp_path / "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
