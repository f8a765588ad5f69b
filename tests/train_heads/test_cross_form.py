"""A head trained on one stored form of a backbone evaluates on another form of it (and says which it read); a store of
another backbone is still refused, whatever its form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from clshelpers import build_label_store
from test_run_record import copy_store

from fcache import store as fstore
from fcache.cli import main
from fcache.store.recode import recode
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--num-workers", "0", "--device", "cpu", "--json"]
COMPACT = ("int8", "int4")
SCORE_TOLERANCE = 0.02  # the quantisation moves each class score of the probe by less than this


def predictions(summary: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(summary["out"]) / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A linear probe trained on an fp16 store, and the fp16 validation store it was scored on."""
    d = tmp_path_factory.mktemp("forms")
    for name, seed in (("train", 0), ("val", 1)):
        build_label_store(d / f"{name}-fp32.zarr", n=16, seed=seed)
        recode(d / f"{name}-fp32.zarr", d / f"{name}.zarr", dtype="fp16")
    run = d / "run"
    args = ["train-head", "--task", "classification", "--head", "linear", "--store", str(d / "train.zarr"), "--out", str(run)]
    r = CliRunner().invoke(main, [*args, "--iters", "30", "--batch-size", "8", *QUICK])
    assert r.exit_code == 0, r.output
    return run, d / "val.zarr"


@pytest.mark.parametrize("form", COMPACT)
def test_a_head_trained_on_fp16_evaluates_on_a_compact_store_of_the_same_backbone(trained, tmp_path, form):
    run, val = trained
    compact = tmp_path / f"val-{form}.zarr"
    recode(val, compact, dtype=form)
    results = {}
    for store in (val, compact):
        r = CliRunner().invoke(main, ["eval", str(run), "--store", str(store), *QUICK])
        assert r.exit_code == 0, r.output
        results[store] = json.loads(r.stdout)
    ref, got = results[val], results[compact]
    assert (ref["form"], got["form"]) == ("fp16", form)
    assert ref["metrics"]["avg/top1"] >= 0.9  # the probe learned the class the features carry...
    assert got["metrics"] == pytest.approx(ref["metrics"], abs=1 / 16)  # ...and scores the same on the compact store (one sample may flip)
    for a, b in zip(predictions(ref), predictions(got), strict=True):
        assert a["key"] == b["key"] and a["top5"] == b["top5"]
        assert b["top5_scores"] == pytest.approx(a["top5_scores"], abs=SCORE_TOLERANCE)
    assert got["out"] != ref["out"]  # each store keeps its own results in RUN/eval/
    r = CliRunner().invoke(main, ["eval", str(run), "--store", str(compact), "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0 and f"(features: {form})" in r.stdout.splitlines()[0]


def test_a_compact_store_of_another_backbone_is_still_refused(trained, tmp_path):
    run, val = trained
    other = copy_store(val, tmp_path / "other.zarr", seed=7)  # random-init weights of another seed: another backbone
    recode(other, tmp_path / "other-int8.zarr", dtype="int8")
    assert fstore.open(tmp_path / "other-int8.zarr").manifest.storage.dtype == "int8"
    r = CliRunner().invoke(main, ["eval", str(run), "--store", str(tmp_path / "other-int8.zarr"), *QUICK])
    refused(r, "holds features of another backbone", "seed: ")
