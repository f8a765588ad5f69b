"""An output that cannot be written is one line naming the path, exit code 2, nothing created, for every command that
writes: a path under a file, a folder without write permission (not as root, whom permissions do not bind), a RUN that
cannot be written into (eval), a --cache-dir that cannot be; and a failed write on a read-only disk fails once."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcache.cli import main
from helpers import refused

sys.path.insert(0, str(Path(__file__).parent / "train_heads"))
from clshelpers import build_label_store  # noqa: E402

ROOT = os.geteuid() == 0
CPU = ["--num-workers", "0", "--device", "cpu"]
TRAIN = ["train-head", "--task", "classification", "--iters", "1", "--batch-size", "4", "--logger", "none", *CPU]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A label store and a linear probe trained on it for one iteration."""
    d = tmp_path_factory.mktemp("outputs")
    store = build_label_store(d / "train.zarr", n=8)
    r = CliRunner().invoke(main, [*TRAIN, "--store", str(store), "--head", "linear", "--out", str(d / "run")])
    assert r.exit_code == 0, r.output
    return store, d / "run"


def commands(store: Path, run: Path, out: Path) -> dict[str, list[str]]:
    """Each command that writes, with ``out`` as what it writes."""
    return {
        "train-head": [*TRAIN, "--store", str(store), "--head", "linear", "--out", str(out)],
        "train-head-heads": [*TRAIN, "--store", str(store), "--head", "linear", "--head", "linear:dropout=0.5", "--out", str(out)],
        "predict": ["predict", str(run), str(store), "--out", str(out), "--device", "cpu"],
        "export": ["export", str(run), "--head-only", "--format", "safetensors", "--out", str(out / "probe.safetensors")],
        "report": ["report", str(run), "--out", str(out)],
        "copy": ["copy", str(store), str(out)],
        "export-wds": ["export-wds", str(store), "--out", str(out)],
    }


COMMANDS = list(commands(Path(), Path(), Path()))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_file_is_one_line(command, trained, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    refused(CliRunner().invoke(main, commands(*trained, blocker / "out")[command]), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "mine\n"


@pytest.mark.skipif(ROOT, reason="permissions do not bind root")
@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_in_a_folder_without_write_permission_is_one_line(command, trained, tmp_path):
    blocker = tmp_path / "read-only"
    blocker.mkdir(mode=0o555)
    try:
        refused(CliRunner().invoke(main, commands(*trained, blocker / "out")[command]), f"{blocker} is not writable by you")
        assert os.listdir(blocker) == []
    finally:
        blocker.chmod(0o755)


def test_an_output_that_is_a_file_is_one_line(trained, tmp_path):
    store, run = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    for args in (commands(store, run, blocker)["train-head"], commands(store, run, blocker)["predict"]):
        refused(CliRunner().invoke(main, args), str(blocker), "is a file")
    assert blocker.read_text() == "mine\n"


@pytest.mark.skipif(ROOT, reason="permissions do not bind root")
def test_eval_of_a_run_that_cannot_be_written_is_one_line(trained, tmp_path):
    store, run = trained
    mine = shutil.copytree(run, tmp_path / "run")
    mine.chmod(0o555)
    try:
        r = CliRunner().invoke(main, ["eval", str(mine), "--store", str(store), *CPU])
        refused(r, f"RUN {mine}: {mine} is not writable by you", "copy the RUN folder somewhere writable")
        assert sorted(os.listdir(mine)) == sorted(os.listdir(run))
    finally:
        mine.chmod(0o755)


def test_eval_into_a_run_whose_eval_is_a_file_is_one_line(trained, tmp_path):
    """What the checks before the work cannot see is still one line, naming the path (the cli's net for OSErrors)."""
    store, run = trained
    mine = shutil.copytree(run, tmp_path / "run")
    (mine / "eval").write_text("mine\n")
    refused(CliRunner().invoke(main, ["eval", str(mine), "--store", str(store), *CPU]), f"cannot use {mine / 'eval'}", "is a file")


def test_a_cache_dir_that_cannot_be_written_is_one_line(trained, tmp_path, s3_bucket):
    store, _ = trained
    remote = f"{s3_bucket}/train.zarr"
    assert CliRunner().invoke(main, ["copy", str(store), remote]).exit_code == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    args = [*TRAIN, "--store", remote, "--head", "linear", "--out", str(tmp_path / "run"), "--cache-dir", str(blocker / "cache")]
    refused(CliRunner().invoke(main, args), f"--cache-dir {blocker / 'cache'}: {blocker} is a file")
    assert not (tmp_path / "run").exists()


def test_a_failed_write_on_a_read_only_disk_fails_once(tmp_path, monkeypatch):
    """The temporary that could not be written cannot be unlinked either (EROFS): the write's error is the one raised."""
    from fcache.common.files import atomic_file, unusable_path

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as caught, atomic_file(tmp_path / "metrics.json"):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".metrics.json.7.partial"))
    assert caught.value.__context__ is None
    assert unusable_path(caught.value) == (
        f"cannot use {tmp_path / 'metrics.json'}: the file system is read-only; check the path and its permissions, or give another one"
    )


def test_temporaries_are_named_as_the_files_they_stand_for():
    from fcache.common.files import shown_path

    assert shown_path("/r/.model.safetensors.123.partial") == "/r/model.safetensors"
    assert shown_path("/x/.c.zarr.20729-0a1b2c3d.partial") == "/x/c.zarr"
    assert shown_path("/x/.hidden") == "/x/.hidden"
