"""`fcache report --out DIR` and a sweep's folder: a folder of the user's (or a report edited since) is refused before
anything is written; a report folder fcache wrote, by this release or the previous one, is replaced whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from runmaker import coco_metrics, make_run

from fcache.cli import main
from helpers import refused

VAL = "/data/val.zarr"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("runs")
    make_run(d / "fpn", "fpn:channels=8", evals={VAL: coco_metrics(0.3)})
    make_run(d / "bifpn", "bifpn:channels=8", evals={VAL: coco_metrics(0.4)})
    return d


def report(runs: Path, out: Path, *flags: str):
    return CliRunner().invoke(main, ["report", str(runs), "--out", str(out), *flags])


def test_a_folder_holding_the_users_files_is_refused_and_left_as_it_was(runs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    (out / "results.csv").write_text("a,b\n1,2\n")
    refused(report(runs, out), f"--out {out} holds files fcache report did not write", "report.md, results.csv")
    assert sorted(os.listdir(out)) == ["report.md", "results.csv"]
    assert (out / "report.md").read_text() == "my notes\n" and (out / "results.csv").read_text() == "a,b\n1,2\n"


def test_a_report_folder_is_replaced_whole_and_refused_once_edited(runs, tmp_path):
    out = tmp_path / "rep"
    assert report(runs, out, "--per-class").exit_code == 0
    assert (out / "per_class.md").is_file()
    r = report(runs, out)  # fcache's own folder: replaced, the earlier per-class table that this report does not write removed
    assert r.exit_code == 0, r.output
    assert not (out / "per_class.md").exists() and (out / "leaderboard.md").is_file()
    (out / "report.md").write_text((out / "report.md").read_text() + "\nmy conclusions\n")
    refused(report(runs, out), "report.md")
    assert (out / "report.md").read_text().endswith("my conclusions\n")


def test_a_report_folder_of_the_previous_release_is_replaced(runs, tmp_path):
    """0.1.0 recorded nothing of what it wrote: its report.md's first line tells its folder."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "report.md").write_text("# fcache report: 2 run(s)\n")
    (out / "leaderboard.md").write_text("old table\n")
    r = report(runs, out)
    assert r.exit_code == 0, r.output
    assert "fpn:channels=8" in (out / "leaderboard.md").read_text()


def test_a_run_folder_is_no_report_folder(runs):
    refused(report(runs, runs / "fpn"), "config.json")
    assert not (runs / "fpn" / "report.md").exists()


def test_a_sweep_refuses_a_folder_of_the_users_before_training(tmp_path):
    out = tmp_path / "sweep-out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"store: {tmp_path / 'missing.zarr'}\nhead: [fpn]\niters: 2\nout: {out}\n")
    refused(CliRunner().invoke(main, ["sweep", str(spec)]), "notes.txt")
    assert os.listdir(out) == ["notes.txt"]
