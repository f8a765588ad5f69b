"""A RUN folder's records (config.json, metrics.jsonl, checkpoint.pt, model.safetensors) that are garbage, cut or
hostile are refused in one line naming the file, never with a traceback; an atomic write that fails leaves nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fcache.cli import main
from fcache.train_heads.runfolder import CHECKPOINT, CONFIG, METRICS, MODEL
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = "fpn:channels=8,rois=8,rpn_batch=8"


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
    CHECKPOINTS[what](copy / CHECKPOINT)
    r = train(det_store, copy, "--resume")
    refused(r, str(copy / CHECKPOINT))
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
    assert r.stderr.strip().splitlines()[-1] == f"Error: disk full ({copy / CHECKPOINT}): free some space and rerun with --resume"
    assert not list(copy.glob("*.partial"))


def test_stale_temporaries_of_a_run_are_removed_by_the_next(copy, det_store):
    (copy / f".{CHECKPOINT}.99999.partial").write_bytes(b"half a checkpoint")
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
    while not (out / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted: stopped at iteration ") and "Traceback" not in err
    assert f"{out / CHECKPOINT} (iteration " in last and last.endswith("--out " + str(out) + " --resume")
    kept = int(last.split("(iteration ")[1].split(")")[0])
    assert kept >= 2 and kept % 2 == 0 and torch.load(out / CHECKPOINT, weights_only=True)["iteration"] == kept
