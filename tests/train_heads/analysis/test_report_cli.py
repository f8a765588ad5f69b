"""`fcache report`: the table, the metric-vs-parameters plot, the loss curves and report.md from RUN folders (a
multi-head pass here), each value traced back to the runs' own files; bad paths refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from fcache.cli import main
from fcache.train_heads.analysis.report import find_runs, loss_curves
from fcache.train_heads.analysis.results import load_rows
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = ["fpn:channels=8,rois=8,rpn_batch=8", "bifpn:layers=1,channels=32,rois=8,rpn_batch=8"]


@pytest.fixture(scope="module")
def runs(det_store, tmp_path_factory) -> Path:
    """Two heads trained in one pass and evaluated; a third run trained without evaluation."""
    d = tmp_path_factory.mktemp("report")
    common = ["--store", str(det_store), "--iters", "3", "--batch-size", "1", "--warmup", "1", "--lr", "1e-3"]
    common += ["--num-workers", "0", "--device", "cpu", "--log-every", "1", "--json"]
    heads = [x for h in HEADS for x in ("--head", h)]
    r = CliRunner().invoke(main, ["train-head", *common, *heads, "--val-store", str(det_store), "--out", str(d / "pass")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train-head", *common, "--head", HEADS[0], "--seed", "1", "--out", str(d / "noeval")])
    assert r.exit_code == 0, r.output
    return d


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_report_tables_plots_and_traces_every_value(runs, tmp_path):
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["report", str(runs / "pass"), str(runs / "noeval"), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["runs"] == 3
    rows = load_rows(out / "results.csv")
    assert len(rows) == 3 and {r["head"] for r in rows} == set(HEADS)
    for row in rows:
        run = Path(row["run"])
        config = json.loads((run / "config.json").read_text())
        assert row["trainable_params"] == config["trainable_params"] > 0
        evals = [x for x in records(run) if x.get("event") == "eval"]
        training = [x for x in records(run) if x.get("event") is None]
        assert row["peak_mem_gb"] == max(x["peak_mem_gb"] for x in training) > 0  # recorded by the loop (CPU: peak RSS)
        assert row["s_per_iter"] == pytest.approx(training[-1]["time_s"] / 3, abs=1e-4)
        if run.name == "noeval":
            assert row["value"] is None and not evals
        else:
            assert row["value"] == evals[-1]["box/AP"] and row["mask/AP50"] == evals[-1]["mask/AP50"]
            per_class = json.loads((run / evals[-1]["eval_dir"] / "detection.json").read_text())
            defined = [c["AP"] for c in per_class["box"]["classes"] if c["AP"] is not None]
            assert defined and row["box/AP"] == pytest.approx(sum(defined) / len(defined))  # COCO's AP: the classes' mean
    md = (out / "report.md").read_text()
    assert "![metric against trainable parameters](results.png)" in md and "![training loss](losses.png)" in md
    assert "Not evaluated yet (no metric): noeval" in md
    assert md.count("| fpn:channels=8") == 2 and "| bifpn:layers=1" in md
    for png in ("results.png", "losses.png"):
        img = imread(out / png)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.01  # drawn, not blank
    assert "report: " in CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "text")]).output


def test_loss_curves_are_the_logged_losses(runs):
    run = runs / "noeval"
    want = [(x["iter"], x["loss"]) for x in records(run) if "loss" in x]
    assert loss_curves(run) == want and [i for i, _ in want] == [1, 2, 3]


def test_find_runs_searches_parents_once(runs):
    found = find_runs([runs, runs / "noeval"])
    assert len(found) == 3 and len(set(found)) == 3
    assert (runs / "noeval").resolve() in found


def test_bad_paths_are_refused(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(CliRunner().invoke(main, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]), "holds no fcache run folder")
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
