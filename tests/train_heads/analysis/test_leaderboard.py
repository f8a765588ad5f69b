"""`fcache report` as a leaderboard and `fcache runs`, on RUN folders of known contents (runmaker): ranking by the main
metric, seeds as mean ± std with n, metric order, cost columns, per-class tables, figures as PNG and PDF with every
single point visible, heads that differ only in a key kept apart; run statuses finished / running / stopped / diverged."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from runmaker import coco_metrics, make_run

from fcache.cli import main
from fcache.train_heads.analysis import leaderboard as lb
from fcache.train_heads.analysis.figures import draw_losses, draw_metric, metric_series
from fcache.train_heads.analysis.results import collect
from helpers import refused

VAL = "/data/val.zarr"
FPN, BIFPN2, BIFPN3, ROIS = "fpn:channels=8", "bifpn:channels=8,layers=2", "bifpn:channels=8,layers=3", "fpn:channels=8,rois=8"


def detection_classes(cat: float) -> dict:
    classes = [{"class": "cat", "id": 1, "AP": cat}, {"class": "dog", "id": 2, "AP": None}]
    return {"detection.json": {"box": {"classes": classes}, "mask": {"classes": classes}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("board")
    for seed, (ap, peak, cat) in enumerate([(0.30, 0.5, 0.5), (0.34, 0.6, 0.6), (0.32, 0.7, 0.7)]):
        make_run(d / f"fpn-s{seed}", FPN, seed=seed, evals={VAL: coco_metrics(ap) | coco_metrics(ap - 0.1, "mask")},
                 per_class=detection_classes(cat), losses=[2.0, 1.0], seconds=10.0, peak_gb=peak)  # fmt: skip
    for seed, ap in enumerate([0.40, 0.44]):
        make_run(d / f"bifpn2-s{seed}", BIFPN2, seed=seed, params=2_000_000, evals={VAL: coco_metrics(ap) | coco_metrics(ap, "mask")},
                 losses=[2.0, 1.5], seconds=30.0)  # fmt: skip
    make_run(d / "rois", ROIS, evals={VAL: coco_metrics(0.10) | coco_metrics(0.1, "mask")}, losses=[1.5])  # one point, same params as fpn
    make_run(d / "fpn-lr", FPN, lr=2e-3, evals={VAL: coco_metrics(0.05) | coco_metrics(0.05, "mask")})
    make_run(d / "bifpn3", BIFPN3, params=3_000_000)  # not evaluated
    return d


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(out), "--per-class", "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def cells(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def test_entries_are_ranked_with_mean_std_and_n(report):
    _, summary = report
    board = summary["leaderboard"]
    assert [(e["rank"], e["head"], e["settings"], e["n"]) for e in board] == [
        (1, BIFPN2, {"lr": 1e-3}, 2),
        (2, FPN, {"lr": 1e-3}, 3),
        (3, ROIS, {"lr": 1e-3}, 1),
        (4, FPN, {"lr": 2e-3}, 1),
        (5, BIFPN3, {"lr": 1e-3}, 1),
    ]
    bifpn, fpn, rois, _, unevaluated = board
    assert bifpn["value"] == pytest.approx(0.42) and bifpn["std"] == pytest.approx(statistics.stdev([0.40, 0.44]))
    assert fpn["value"] == pytest.approx(0.32) and fpn["std"] == pytest.approx(0.02) and fpn["seeds"] == [0, 1, 2]
    assert fpn["metrics"]["mask/AP50"]["mean"] == pytest.approx(0.42) and fpn["metrics"]["mask/AP50"]["std"] == pytest.approx(0.02)
    assert rois["std"] is None and unevaluated["value"] is None and unevaluated["eval_store"] is None
    assert (fpn["s_per_iter"], fpn["peak_mem_gb"], fpn["time_s"], fpn["trainable_params"]) == (1.0, 0.7, 10.0, 1_000_000)
    assert fpn["metric"] == "box/AP" and len(fpn["runs"]) == 3


def test_the_printed_table_orders_metrics_and_shows_costs(runs, report, tmp_path):
    out, _ = report
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert "### detection: ranked by box/AP (%, mean ± std over n seeds)" in r.output
    table = cells((out / "leaderboard.md").read_text())
    assert cells(r.output)[: len(table)] == table  # what is printed is what is written
    metrics = [f"{f}/{m}" for f in ("box", "mask") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    assert table[0] == ["#", "head", "settings", "eval store", "n", *metrics, "params (M)", "train time", "s/iter", "peak mem (GB)"]
    assert [row[1] for row in table[1:]] == [BIFPN2, FPN, ROIS, FPN, BIFPN3]
    fpn = dict(zip(table[0], table[2], strict=True))
    assert (fpn["#"], fpn["settings"], fpn["eval store"], fpn["n"]) == ("2", "lr=0.001", "val.zarr", "3")
    assert (fpn["box/AP"], fpn["box/AP50"], fpn["mask/AP"]) == ("32.0 ± 2.0", "52.0 ± 2.0", "22.0 ± 2.0")
    assert (fpn["params (M)"], fpn["train time"], fpn["s/iter"], fpn["peak mem (GB)"]) == ("1.00", "10.0 s", "1.00", "0.70")
    assert dict(zip(table[0], table[3], strict=True))["box/AP"] == "10.0"  # n = 1: no ±
    assert dict(zip(table[0], table[5], strict=True))["box/AP"] == "-" and table[5][3] == "(not evaluated)"
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,rank,head,settings,eval_store,eval_name,n,n_runs,seeds,metric,box/AP,box/AP std,")
    assert len(csv_lines) == 1 + 5


def test_stores_of_one_name_are_told_apart_and_a_repeated_seed_counts_as_a_run(tmp_path):
    """Two val.zarr of different fingerprints are two lines named as the RUN names their eval folders; a copied RUN and
    the same seed trained twice are runs of one seed."""
    x, y = "/x/val.zarr", "/y/val.zarr"
    fps = {x: "aaaaaaaa" + "1" * 56, y: "bbbbbbbb" + "2" * 56}
    d = tmp_path / "runs"
    make_run(d / "s0", FPN, seed=0, evals={x: coco_metrics(0.30)}, fingerprints=fps)
    shutil.copytree(d / "s0", d / "s0-copy")
    make_run(d / "s0-again", FPN, seed=0, evals={x: coco_metrics(0.34)}, fingerprints=fps)
    make_run(d / "s1", FPN, seed=1, evals={x: coco_metrics(0.32), y: coco_metrics(0.50)}, fingerprints=fps)
    r = CliRunner().invoke(main, ["report", str(d), "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    board = json.loads(r.stdout)["leaderboard"]
    assert [(e["eval_name"], e["n"], e["n_runs"], e["seeds"]) for e in board] == [
        ("val-bbbbbbbb", 1, 1, [1]),
        ("val-aaaaaaaa", 2, 4, [0, 0, 0, 1]),
    ]
    table = cells((tmp_path / "rep" / "leaderboard.md").read_text())
    assert [(row[2], row[3]) for row in table[1:]] == [("val-bbbbbbbb", "1"), ("val-aaaaaaaa", "2 (4 runs)")]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "mean ± std over a line's runs; n: its seeds, and runs where a seed repeats" in md
    results = cells((tmp_path / "rep" / "results.md").read_text())
    column = results[0].index("eval store")
    assert sorted(row[column] for row in results[1:]) == ["val-aaaaaaaa"] * 4 + ["val-bbbbbbbb"]


def test_per_class_tables(report):
    out, summary = report
    md = (out / "per_class.md").read_text()
    assert "#### detection: box AP per class on val.zarr (%)" in md and "#### detection: mask AP per class on val.zarr (%)" in md
    box = cells(md.split("#### detection: mask AP")[0])
    assert box[0] == ["class", f"#2 {FPN}, lr=0.001"]  # only the fpn runs wrote per-class files
    assert box[1] == ["cat", "60.0 ± 10.0"] and box[2] == ["dog", "-"]
    assert "## Per class" in (out / "report.md").read_text()


def test_figures_are_png_and_pdf(report):
    out, summary = report
    for name in ("results", "losses"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert summary["files"][f"{'png' if name == 'results' else 'losses'}_pdf"] == str(out / f"{name}.pdf")


def test_single_points_have_markers_and_heads_that_differ_in_a_key_stay_apart(runs):
    rows = collect(sorted(p for p in runs.iterdir()))
    fig = draw_losses(rows)
    (ax,) = fig.axes
    by_label = {line.get_label(): line for line in ax.lines}
    single = next(line for label, line in by_label.items() if label.startswith(ROIS))
    assert len(single.get_xdata()) == 1 and single.get_marker() == "o"
    two = next(line for label, line in by_label.items() if label.startswith(BIFPN2))
    assert len(two.get_xdata()) == 2 and two.get_marker() in ("None", None, "")

    board = lb.entries(rows)
    series = metric_series(board["detection"])
    assert series == {  # fpn, fpn rois=8 and fpn lr 2e-3 share 1.0 M parameters: each its own point
        "bifpn": [(2_000_000, pytest.approx(0.42), pytest.approx(statistics.stdev([0.40, 0.44])))],
        f"fpn: {FPN}, lr=0.001": [(1_000_000, pytest.approx(0.32), pytest.approx(0.02))],
        f"fpn: {ROIS}, lr=0.001": [(1_000_000, pytest.approx(0.10), 0.0)],
        f"fpn: {FPN}, lr=0.002": [(1_000_000, pytest.approx(0.05), 0.0)],
    }
    fig = draw_metric(board)
    (ax,) = fig.axes
    drawn = [c.lines[0] for c in ax.containers if c.get_label() in series]  # errorbar containers: the data line first
    assert len(drawn) == 4 and all(line.get_marker() == "o" for line in drawn)
    assert sorted(float(line.get_ydata()[0]) for line in drawn) == pytest.approx([5.0, 10.0, 32.0, 42.0])  # percent


# -- fcache runs -----------------------------------------------------------------------------------


@pytest.fixture
def statuses(tmp_path) -> Path:
    d = tmp_path / "runs"
    make_run(d / "done", FPN, evals={VAL: coco_metrics(0.3)})
    make_run(d / "live", FPN, iters=100, saved=40, logged=45, losses=[1.0, 0.9, 0.8])
    stopped = make_run(d / "cut", FPN, iters=100, saved=40, logged=40, losses=[1.0, 0.9])
    slow = make_run(d / "slow", FPN, iters=100, saved=-1, logged=2, losses=[1.0, 0.9], seconds=2000.0)  # logs every 1000 s
    error = "the loss is not finite at iteration 5 (nan); lower --lr, or add --clip 1.0"
    make_run(d / "nan", BIFPN2, iters=100, saved=-1, logged=4, losses=[1.0], events=[{"event": "diverged", "iter": 5, "error": error}])
    make_run(d / "patience", FPN, iters=200, saved=40, logged=40, events=[{"event": "early_stop", "iter": 40}])
    (make_run(d / "broken", FPN) / "config.json").write_text('{"config": {"head": 3')  # cut while written by hand
    hours_ago, twenty_minutes_ago = time.time() - 7200, time.time() - 1200
    for run, when in ((stopped, hours_ago), (slow, twenty_minutes_ago)):
        for f in run.iterdir():
            os.utime(f, (when, when))
    return d


def test_runs_lists_each_status(statuses):
    r = CliRunner().invoke(main, ["runs", str(statuses), "--json"])
    assert r.exit_code == 0, r.output
    lines = {Path(x["run"]).name: x for x in json.loads(r.stdout)}
    assert {k: v["status"] for k, v in lines.items()} == {
        "cut": "stopped",
        "done": "finished",
        "live": "running",
        "nan": "diverged",
        "slow": "running",  # 20 minutes without a change, but it logs every 1000 s: 3 gaps of its own are allowed
        "patience": "early-stopped",
        "broken": "damaged",  # listed, with why; the others shown as usual
    }
    assert "config.json" in lines["broken"]["error"] and lines["broken"]["task"] is None
    assert (lines["done"]["iters_done"], lines["done"]["iters"], lines["done"]["best"], lines["done"]["eval_store"]) == (10, 10, 0.3, VAL)
    assert (lines["live"]["iters_done"], lines["live"]["saved_iter"], lines["live"]["best"]) == (45, 40, None)
    assert lines["nan"]["error"].startswith("the loss is not finite at iteration 5") and lines["nan"]["head"] == BIFPN2
    tight = CliRunner().invoke(main, ["runs", str(statuses), "--json", "--stale-after", "0"])
    assert {Path(x["run"]).name: x["status"] for x in json.loads(tight.stdout)}["slow"] == "running"  # its own gaps still count
    text = CliRunner().invoke(main, ["runs", str(statuses)]).output
    assert "| " + str(statuses / "done") in text and "box/AP 30.0" in text and "10/10" in text
    assert "7 run(s): 1 finished, 1 early-stopped, 2 running, 1 stopped, 1 diverged, 1 damaged" in text
    assert "40/200" in text and "damaged: " in text and "broken" in text.splitlines()[-1]


def test_report_leaves_a_damaged_run_out_and_says_so(statuses, tmp_path):
    r = CliRunner().invoke(main, ["report", str(statuses), "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["runs"] == 6 and list(summary["damaged"]) == [str((statuses / "broken").resolve())]
    assert "broken" in (tmp_path / "rep" / "report.md").read_text().split("Damaged")[1]
    only = CliRunner().invoke(main, ["report", str(statuses / "broken"), "--out", str(tmp_path / "none")])
    refused(only, "no RUN folder can be read", "config.json")
    assert not (tmp_path / "none").exists()


def test_runs_refuses_a_folder_without_runs(tmp_path):
    refused(CliRunner().invoke(main, ["runs", str(tmp_path)]), "holds no fcache run folder")
