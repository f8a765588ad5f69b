"""Depth end to end on a small generated set (photos with shapes pasted at known depths, `fcache extract --dataset
depth-folder`): the head's RMSE falls well below the mean-depth predictor's, the best checkpoint and `fcache report` /
`fcache runs` take the lower RMSE as the better, `fcache predict` writes 16-bit PNGs equal to the predicted depth in
millimetres (online: equal to `fcache eval`'s; from the store: the same files), `fcache.load` and `fcache export` give
the head's depth, `fcache bench` measures a depth head on synthetic depth maps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fcache
from fcache import store as fstore
from fcache.cli import main
from fcache.spec import Targets
from fcache.train_heads.depth.maps import read_depth_png
from fcache.train_heads.depth.outputs import depth_on_canvas
from fcache.train_heads.evaluation import load_head

sys.path.insert(0, str(Path(__file__).parents[1] / "train_heads"))
from depthhelpers import build_depth_stores  # noqa: E402

pytestmark = pytest.mark.slow
CPU = ["--num-workers", "0", "--device", "cpu"]
LINEAR = "linear:levels=p2,upsample=1,max_depth=5"
TRAIN = ["--iters", "60", "--batch-size", "4", "--lr", "1e-2", "--warmup", "0", "--log-every", "20", "--eval-every", "20"]


def cli(*args: str) -> dict:
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: extraction and prediction then run the very same kernels."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    d = tmp_path_factory.mktemp("depth")
    train, val = build_depth_stores(d)
    run = d / "runs" / "linear"
    summary = cli("train-head", "--task", "depth", "--store", str(train), "--val-store", str(val), "--head", LINEAR, "--out", str(run),
                  *TRAIN, *CPU)  # fmt: skip
    return train, val, run, summary


def mean_depth_rmse(train: Path, val: Path) -> float:
    """The RMSE (per image, then averaged, as the protocol) of predicting the training set's mean depth everywhere."""
    t, v = fstore.open(train), fstore.open(val)
    depths = np.stack([np.asarray(t.target(Targets.DEPTH, i)) for i in t.ok_indices])
    mean = float(depths[depths > 0].mean())
    rmses = []
    for i in v.ok_indices:
        truth = np.asarray(v.target(Targets.DEPTH, i))
        rmses.append(float(np.sqrt(np.mean((truth[truth > 0] - mean) ** 2))))
    return float(np.mean(rmses))


def test_the_head_learns_depth_far_better_than_the_mean(trained):
    train, val, run, summary = trained
    baseline = mean_depth_rmse(train, val)
    rmse = summary["eval"]["ss/RMSE"]
    assert baseline > 0.9 and rmse < 0.5 * baseline, (rmse, baseline)
    assert summary["eval"]["ss/d1"] > 0.8 and summary["eval"]["flip/RMSE"] < 0.5 * baseline  # the flip view averaged in
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "eval"]
    best = min(evals, key=lambda r: (r["ss/RMSE"], r["iter"]))  # lower is better: the first of the lowest
    assert [r["iter"] for r in evals] == [20, 40, 60] and summary["best"] == {"metric": "ss/RMSE", "value": best["ss/RMSE"],
                                                                                "iter": best["iter"]}  # fmt: skip
    report = json.loads((run / "eval" / "val" / "depth.json").read_text())
    assert report["views"] == ["plain", "flip"] and report["ss"]["images"] == 4 and report["ss"]["RMSE"] == rmse
    ranges = {r["range"]: r for r in report["ss"]["ranges"]}
    assert ranges["1-2 m"]["pixels"] > 0 and ranges["2-3 m"]["pixels"] > 0 and ranges["4-5 m"]["pixels"] > 0  # 1, 2.5, 4 m
    keys = [str(k) for k in fstore.open(val).keys]
    assert sorted(p.name for p in (run / "eval" / "val" / "depth").iterdir()) == sorted(f"images__val__{Path(k).stem}.png" for k in keys)


def test_report_and_runs_rank_the_lower_rmse_first(trained, tmp_path):
    """A worse head (a DPT after 2 iterations) ranks below the trained probe, though its RMSE is the larger number."""
    train, val, run, summary = trained
    short = run.parent / "short"  # a DPT trained for 2 iterations: worse
    worse = cli("train-head", "--task", "depth", "--store", str(train), "--val-store", str(val), "--head", "dpt:channels=16,max_depth=5",
                "--out", str(short), "--iters", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup", "0", *CPU)  # fmt: skip
    assert worse["eval"]["ss/RMSE"] > summary["eval"]["ss/RMSE"]
    r = cli("report", str(run.parent), "--out", str(tmp_path / "rep"), "--per-class")
    board = r["leaderboard"]
    assert [e["runs"][0] for e in board] == [str(run), str(short)] and board[0]["value"] == summary["eval"]["ss/RMSE"]
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "### depth: ranked by ss/RMSE (mean ± std over n seeds)" in md and f"{summary['eval']['ss/RMSE']:.3f}" in md  # metres
    per_class = (tmp_path / "rep" / "per_class.md").read_text()
    assert "#### depth: ss d1 per depth range on val.zarr" in per_class and "| 2-3 m " in per_class
    runs = CliRunner().invoke(main, ["runs", str(run.parent), "--json"])
    best = {r["run"]: r["best"] for r in json.loads(runs.stdout)}
    assert best[str(run)] == min(r["ss/RMSE"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "ss/RMSE" in r)


def test_predict_writes_millimetre_pngs_equal_to_eval_and_load(trained, tmp_path):
    train, val, run, _ = trained
    images = Path(str(fstore.open(val).manifest.dataset.source.root)) / "images" / "val"
    out = tmp_path / "pred"
    cli("predict", str(run), str(images), "--out", str(out), "--random-init", "--test-views", "flip", "--batch-size", "1", "--draw",
        "--device", "cpu")  # fmt: skip
    model = fcache.load(run, random_init=True, device="cpu", test_views=("flip",), batch_size=1)
    for path in sorted(images.iterdir()):
        png = Image.open(out / "depth" / f"{path.stem}.png")
        mm = np.asarray(png)
        assert png.mode.startswith("I;16") and mm.shape == Image.open(path).size[::-1]
        evaluated = np.asarray(Image.open(run / "eval" / "val" / "depth" / f"images__val__{path.stem}.png")).astype(np.int64)
        diff = np.abs(mm.astype(np.int64) - evaluated)  # the online path is the extraction path; eval ran batches of 4
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
        (loaded,) = model([path])
        assert loaded.dtype == torch.float32 and tuple(loaded.shape) == mm.shape
        np.testing.assert_array_equal(np.round(loaded.numpy() * 1000).astype(np.uint16), mm)
    assert len(list((out / "overlays").iterdir())) == 4
    cached = tmp_path / "cached"
    summary = cli("predict", str(run), str(val), "--out", str(cached), "--batch-size", "4", "--draw", "--device", "cpu")  # as eval
    assert summary["task"] == "depth" and summary["files"] == [str(cached / "depth"), str(cached / "overlays")]
    for p in (run / "eval" / "val" / "depth").iterdir():
        assert (cached / "depth" / p.name).read_bytes() == p.read_bytes()
    drawn = Image.open(next((cached / "overlays").iterdir()))
    assert drawn.width > 3 * 512  # image, prediction and ground truth side by side
    assert read_depth_png(cached / "depth" / p.name).max() <= 5.0


def test_export_gives_the_heads_depth_on_the_canvas(trained, tmp_path):
    _, _, run, _ = trained
    summary = cli("export", str(run), "--out", str(tmp_path / "depth.pt2"), "--head-only", "--batch-size", "2")
    config = json.loads(Path(summary["config"]).read_text())
    assert config["task"] == "depth" and config["outputs"] == "depth (B, 1, S, S) in metres on the canvas"
    shapes = config["inputs"]["features"]
    feats = {lv: torch.randn(*shape, generator=torch.Generator().manual_seed(k)) for k, (lv, shape) in enumerate(shapes.items())}
    head = load_head(run).model
    with torch.no_grad():
        want = depth_on_canvas(head, feats, 128)
        got = torch.export.load(summary["out"]).module()(feats)
    assert got.shape == want.shape == (2, 1, 128, 128) and float((got - want).abs().max()) <= 1e-5
    assert float(got.min()) >= 0.001 and float(got.max()) <= 5.0


def test_bench_measures_a_depth_head_on_synthetic_depth_maps():
    args = ["bench", "--task", "depth", "--input-size", "64", "--batch-size", "2", "--head", "linear:levels=p2,upsample=1", "--iters", "1"]
    r = CliRunner().invoke(main, [*args, "--features-only", "--device", "cpu", "--num-workers", "0", "--json"])
    (row,) = json.loads(r.output)
    assert r.exit_code == 0 and row["setting"] == "store" and row["task"] == "depth" and row["s_per_iter"] > 0, row
    assert row["head_params"] == 96 * 256 + 256 and "frames" not in row  # SwinV2-T's p2 (96 channels) -> 256 bins
