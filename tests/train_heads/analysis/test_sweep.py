"""`fcache sweep`: a grid of variants trained, tabulated and plotted; finished variants skipped on rerun; the same
results on a local dask cluster as in sequence; bad SPECs refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from matplotlib.image import imread
from safetensors.torch import load_file

from fcache.cli import main
from fcache.train_heads.analysis.results import head_family, load_rows, markdown, training_seconds
from fcache.train_heads.analysis.sweep import load_spec
from helpers import refused

FPN = "fpn:channels=8,rois=8,rpn_batch=8"
BIFPN = "bifpn:channels=32,rois=8,rpn_batch=8,layers={}"
HEADS = [FPN, BIFPN.format(1), BIFPN.format(2)]


def write_spec(path: Path, train: Path, **over) -> Path:
    spec = {"task": "detection", "store": str(train), "val_store": str(train), "iters": 2, "batch_size": 1, "warmup": 1}
    spec |= {"head": HEADS, "lr": ["1e-3"], "num_workers": 0, "device": "cpu", "log_every": 1, "threads": 1}
    path.write_text(yaml.safe_dump(spec | over))
    return path


def sweep(spec: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out), "--json", *extra])


def runs_of(out: Path) -> dict[str, Path]:
    return {p.name: p for p in (out / "runs").iterdir()}


@pytest.fixture(scope="module")
def sequential(det_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    r = sweep(write_spec(d / "grid.yaml", det_store), d / "out")
    assert r.exit_code == 0, r.output
    return d, json.loads(r.stdout)


def test_results_hold_one_row_per_variant(sequential):
    d, summary = sequential
    assert (summary["variants"], summary["skipped"], summary["trained"], summary["failed"]) == (3, 0, 3, {})
    rows = load_rows(d / "out" / "results.csv")
    assert sorted(r["head"] for r in rows) == sorted(HEADS)
    assert {r["family"] for r in rows} == {"fpn", "bifpn"}
    for row in rows:
        run = Path(row["run"])
        assert run.parent == d / "out" / "runs"
        config = json.loads((run / "config.json").read_text())
        evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        assert row["trainable_params"] == config["trainable_params"] > 0
        assert (row["lr"], row["train_fraction"], row["iters"], row["store"]) == (1e-3, 1.0, 2, config["config"]["store"])
        assert row["metric"] == "box/AP" and row["value"] == evals[-1]["box/AP"] == row["box/AP"]
        assert row["mask/AP50"] == evals[-1]["mask/AP50"] and row["time_s"] > 0
    bifpn = sorted((r for r in rows if r["family"] == "bifpn"), key=lambda r: r["trainable_params"])
    assert [r["head"] for r in bifpn] == [BIFPN.format(1), BIFPN.format(2)]  # a second BiFPN layer adds parameters
    table = (d / "out" / "results.md").read_text().splitlines()
    assert len(table) == 2 + 3 and all(any(h in line for line in table) for h in HEADS)
    assert table[0].startswith("| run | task | head | family | trainable params | lr |")
    board = summary["leaderboard"]  # one seed each: n = 1, ranked by box/AP as the rows say
    assert sorted(e["head"] for e in board) == sorted(HEADS) and {e["n"] for e in board} == {1}
    assert [e["value"] for e in board] == sorted((r["value"] for r in rows), reverse=True)
    assert (d / "out" / "leaderboard.md").is_file() and (d / "out" / "results.pdf").is_file()
    losses = imread(d / "out" / "losses.png")
    assert losses.shape[0] > 300 and losses[..., :3].std() > 0.01
    image = imread(d / "out" / "results.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_a_rerun_skips_finished_variants(sequential, det_store):
    d, _ = sequential
    before = {name: (p / "model.safetensors").stat().st_mtime_ns for name, p in runs_of(d / "out").items()}
    r = sweep(d / "grid.yaml", d / "out")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["skipped"], json.loads(r.stdout)["trained"]) == (3, 0)
    assert {name: (p / "model.safetensors").stat().st_mtime_ns for name, p in runs_of(d / "out").items()} == before
    # a new lr for the FPN head: its first variant is the finished one (same configuration), the second is new
    grown = sweep(write_spec(d / "grown.yaml", det_store, head=FPN, lr=["1e-3", 2e-3]), d / "out")
    assert grown.exit_code == 0, grown.output
    summary = json.loads(grown.stdout)
    assert (summary["variants"], summary["skipped"], summary["trained"]) == (2, 1, 1)
    assert sorted(r["lr"] for r in load_rows(d / "out" / "results.csv")) == [1e-3, 2e-3]
    assert len(runs_of(d / "out")) == 4


@pytest.mark.slow
def test_a_local_dask_cluster_gives_the_sequential_results(sequential, tmp_path):
    d, summary = sequential
    r = sweep(d / "grid.yaml", tmp_path / "out", "--cluster", "local:2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trained"] == 3
    timing = ("run", "time_s", "s_per_iter", "peak_mem_gb")
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k not in timing} for r in rows), key=str)  # noqa: E731
    assert strip(load_rows(tmp_path / "out" / "results.csv")) == strip(summary["rows"])
    seq, par = runs_of(d / "out"), runs_of(tmp_path / "out")
    assert len(par) == 3 and set(par) <= set(seq)
    for name in par:
        a, b = (load_file(str(p[name] / "model.safetensors")) for p in (seq, par))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize(
    ("over", "extra", "fragments"),
    [
        ({"lrs": [1e-3]}, (), ("unknown key(s) 'lrs'", "known:")),
        ({"head": [FPN, "retinanet"]}, (), ("unknown head 'retinanet' for detection",)),
        ({"head": [FPN, "fpn:layers=2"]}, (), ("unknown key 'layers'",)),
        ({"iters": [1, 2]}, (), ("iters takes one value", "lists (grid axes) are allowed for")),
        ({"lr": ["fast"]}, (), ("lr: 'fast' is not a number",)),
        ({"iters": 1e400}, (), ("grid.yaml: iters: inf is not an integer",)),
        ({"lr": [float("nan")]}, (), ("--lr nan: must be a finite number",)),
        ({"head": [FPN, FPN + ",roi=standard"]}, (), ("two grid points are the same variant",)),
        ({"store": ["a.zarr", "b.zarr"], "val_store": ["va.zarr"]}, (), ("val_store lists 1 stores for 2 in store",)),
        ({}, ("--cluster", "local:0"), ("--cluster local:0: needs at least one worker",)),
        ({}, ("--cluster", "local:2", "--scheduler", "tcp://127.0.0.1:8786"), ("--cluster and --scheduler exclude each other",)),
    ],
)
def test_bad_specs_are_refused_before_writing(det_store, tmp_path, over, extra, fragments):
    refused(sweep(write_spec(tmp_path / "grid.yaml", det_store, **over), tmp_path / "out", *extra), *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_yaml_and_missing_keys_are_refused(tmp_path):
    (tmp_path / "broken.yaml").write_text("head: [fpn\niters: 2\n")
    refused(sweep(tmp_path / "broken.yaml", tmp_path / "out"), "is not valid YAML")
    (tmp_path / "list.yaml").write_text("- fpn\n")
    refused(sweep(tmp_path / "list.yaml", tmp_path / "out"), "must be a YAML mapping")
    (tmp_path / "short.yaml").write_text("head: fpn\n")
    refused(sweep(tmp_path / "short.yaml", tmp_path / "out"), "missing store, iters")
    assert not (tmp_path / "out").exists()


def test_a_grid_expands_in_order_with_validation_stores_paired(tmp_path):
    spec = {"store": ["t.zarr", "l.zarr"], "val_store": ["t-val.zarr", "l-val.zarr"], "head": ["fpn", "bifpn"], "iters": 9}
    spec |= {"lr": "3e-4", "train_fraction": [0.1, 1], "warmup": 10.0, "out": "figure4"}
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "fig4.yaml").write_text(yaml.safe_dump(spec))
    s = load_spec(str(tmp_path / "sweeps" / "fig4.yaml"))
    points = s.points()
    assert len(points) == 2 * 2 * 2 and s.out == str(tmp_path / "sweeps" / "figure4")
    at = lambda name: str(tmp_path / "sweeps" / name)  # noqa: E731
    assert points[0] == {"store": at("t.zarr"), "val_store": at("t-val.zarr"), "head": "fpn", "train_fraction": 0.1, "iters": 9,
                         "lr": 3e-4, "warmup": 10}  # fmt: skip
    assert {(p["store"], p["val_store"]) for p in points} == {(at("t.zarr"), at("t-val.zarr")), (at("l.zarr"), at("l-val.zarr"))}
    assert [p["head"] for p in points[:4]] == ["fpn", "fpn", "bifpn", "bifpn"]


def test_store_urls_stay_urls_and_access_keys_pass_through(tmp_path):
    spec = {"store": ["s3://bucket/t.zarr", "local.zarr"], "val_store": "gs://other/v.zarr", "head": "fpn", "iters": 3}
    spec |= {"storage_options": '{"s3": {"profile": "lab"}}', "cache_dir": "cache", "cache_size": "200GB"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    points = load_spec(str(tmp_path / "s.yaml")).points()
    assert [p["store"] for p in points] == ["s3://bucket/t.zarr", str(tmp_path / "local.zarr")]
    assert points[0]["val_store"] == "gs://other/v.zarr" and points[0]["cache_dir"] == str(tmp_path / "cache")
    assert points[0]["storage_options"] == '{"s3": {"profile": "lab"}}' and points[0]["cache_size"] == "200GB"


def test_families_times_and_table_formatting():
    assert head_family("bifpn:layers=3,roi=cascade,channels=64") == "bifpn:roi=cascade"
    assert head_family("upernet:neck=bifpn,layers=5") == "upernet:neck=bifpn"
    assert head_family("temporal:blocks=4,drop_path=0.2") == "temporal"
    assert training_seconds([{"time_s": 1.0}, {"time_s": 2.5}, {"event": "eval"}, {"time_s": 0.5}, {"time_s": 1.5}]) == 4.0
    row = {"run": "/x/runs/fpn-1", "task": "detection", "head": "fpn", "family": "fpn", "trainable_params": 2_500_000, "lr": 3e-4}
    row |= {"train_fraction": 0.1, "store": "/data/coco-l.zarr", "iters": 9, "seed": 0, "metric": "box/AP", "value": None, "time_s": 1.0}
    line = "| fpn-1 | detection | fpn | fpn | 2.50 M | 0.0003 | 0.1 | coco-l.zarr | - | 9 | 0 | box/AP | - | 1 | - | - | - |"
    assert markdown([row]).splitlines()[2] == line


def test_every_train_head_setting_is_a_sweep_key(tmp_path):
    """Walks TrainConfig's flag fields: each one (but ``out`` and ``resume``, the sweep's own) is a SPEC key whose value
    reaches the variant's configuration."""
    import typing

    from fcache.common.flags import flags_of
    from fcache.train_heads.analysis.sweep import SPEC_KEYS
    from fcache.train_heads.config import TrainConfig

    special = {"store": str(tmp_path / "t.zarr"), "val_store": str(tmp_path / "v.zarr"), "cache_dir": str(tmp_path / "cache"),
               "cache_size": "1GB", "storage_options": '{"s3": {}}', "eval_every": "2e", "lr_steps": [0.25, 0.5]}  # fmt: skip
    hints = typing.get_type_hints(TrainConfig)
    spec = {}
    for f, fl in flags_of(TrainConfig):
        if f.name in ("out", "resume", "epochs", "warmup_epochs"):  # the sweep's own; lengths in epochs exclude those in
            assert f.name in SPEC_KEYS or f.name in ("out", "resume"), f.name  # iterations (below)
            continue
        assert f.name in SPEC_KEYS, f.name
        kind = next(t for t in (bool, int, float, str) if t == hints[f.name] or t in typing.get_args(hints[f.name]))
        sample = {bool: not f.default, int: 3, float: 0.5, str: fl.values()[-1] if fl.values() else "text"}[kind]
        spec[f.name] = special.get(f.name, sample)
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(spec))
    (point,) = load_spec(str(tmp_path / "all.yaml")).points()
    cfg = TrainConfig.from_flags(out="o", **point)
    for name, value in spec.items():
        assert getattr(cfg, name) == (tuple(value) if isinstance(value, list) else value), name
        assert getattr(cfg, name) != TrainConfig.__dataclass_fields__[name].default, name  # the value did change something
    lengths = {"store": "t.zarr", "head": "fpn", "epochs": 2, "warmup_epochs": "0.5", "eval_every": 500}
    (tmp_path / "epochs.yaml").write_text(yaml.safe_dump(lengths))
    (point,) = load_spec(str(tmp_path / "epochs.yaml")).points()
    assert (point["epochs"], point["warmup_epochs"], point["eval_every"]) == (2.0, 0.5, "500") and "iters" not in point
