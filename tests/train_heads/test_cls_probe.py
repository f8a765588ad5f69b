"""The linear probe end to end: an ImageFolder extracted by a random-init SwinV2-T, trained, evaluated over views; CLI refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from clshelpers import build_label_store
from PIL import Image

from fcache.cli import main
from fcache.store import layout
from helpers import refused

COLOURS = {"blue": (40, 60, 200), "green": (40, 170, 60), "red": (200, 40, 40)}  # class folders, sorted = label order
SIZES = ((48, 32), (32, 48), (40, 40))  # (w, h): the padding of the 64 px canvas differs between images
EXTRACT = ["--dataset", "folder", "--random-init", "--model", "swinv2-t", "--input-size", "64", "--levels", "p5"]
EXTRACT += ["--num-workers", "0", "--device", "cpu"]
QUICK = ["--num-workers", "0", "--device", "cpu", "--json"]

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_images(root: Path, per_class: int, seed: int) -> Path:
    """root/<colour>/iNN.png: noisy images whose colour is their class."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            w, h = SIZES[k % len(SIZES)]
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"i{k:02d}.png")
    return root


def extract(root: Path, out: Path, *flags: str) -> Path:
    r = CliRunner().invoke(main, ["extract", *EXTRACT, "--root", str(root), *flags, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    flat = d / "flat"
    flat.mkdir()
    for k in range(2):
        Image.fromarray(np.full((32, 48, 3), 60 * k, np.uint8)).save(flat / f"f{k}.png")
    return {
        "train": extract(colour_images(d / "train", 8, seed=0), d / "train.zarr"),
        "val": extract(colour_images(d / "val", 4, seed=1), d / "val.zarr", "--test-views", "flip"),
        "flat": extract(flat, d / "flat.zarr"),
    }


def train(store: Path, out: Path, *flags: str, task: str = "classification", head: str = "linear"):
    return CliRunner().invoke(main, ["train-head", "--store", str(store), "--task", task, "--head", head, "--out", str(out), *flags])


def test_linear_probe_learns_the_labels_the_features_carry(stores, tmp_path):
    out = tmp_path / "run"
    r = train(stores["train"], out, "--val-store", str(stores["val"]), "--iters", "60", "--batch-size", "8", *QUICK)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["trainable_params"] == 768 * 3 + 3  # SwinV2-T p5: 768 channels, 3 classes
    assert summary["eval"]["avg/top1"] >= 0.9, summary["eval"]
    assert set(summary["eval"]) == {f"{f}/top{k}" for f in ("avg", "plain", "flip") for k in (1, 5)}
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["batch_size"], config["lr"], config["weight_decay"], config["schedule"]) == (8, 1e-3, 0.0, "cosine")
    assert config["warmup_epochs"] == 1.0 and config["warmup"] == 3  # ceil(1 epoch x 24 samples / batch 8)
    lines = [json.loads(x) for x in (out / "eval" / "val" / "predictions.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [f"{c}/i{k:02d}.png" for c in COLOURS for k in range(4)]
    assert sum(x["pred_name"] == x["label_name"] for x in lines) == round(12 * summary["eval"]["avg/top1"])

    again = CliRunner().invoke(main, ["eval", str(out), "--store", str(stores["val"]), *QUICK])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["metrics"] == summary["eval"] and json.loads(again.stdout)["samples"] == 12


def test_refusals(stores, tmp_path):
    out = tmp_path / "run"
    one = ["--iters", "1", "--batch-size", "4", *QUICK]
    refused(train(stores["flat"], out, *one), "has no class labels (a folder store with targets: none)", "--task classification needs")
    refused(train(stores["train"], out, *one, task="video"), "is an image store", "--task video needs per-frame features")
    refused(train(stores["train"], out, *one, head="linear:level=p4"), "reads level p4 but the store holds only p5")
    refused(train(stores["train"], out, *one, head="mlp"), "unknown head 'mlp' for classification; choose one of: linear")
    refused(train(stores["train"], out, *one, "--warmup", "5", "--warmup-epochs", "1"), "not both")
    refused(train(stores["train"], out, *one, task="captioning"), "unknown task 'captioning'")
    assert not out.exists()
    assert train(stores["train"], out, *one).exit_code == 0
    refused(CliRunner().invoke(main, ["eval", str(out), "--store", str(stores["flat"])]), "has no class labels")


def test_classes_make_a_split_without_a_class_evaluate(tmp_path):
    """A validation split lacking a class (no red images): with --classes naming all three, both stores share the label
    order and the head trained on three classes scores the two present; without it, the splits disagree and are refused."""
    train_root = colour_images(tmp_path / "train", 3, seed=0)
    val_root = colour_images(tmp_path / "val", 2, seed=1)
    for f in (val_root / "red").iterdir():
        f.unlink()
    (val_root / "red").rmdir()
    names = ",".join(COLOURS)
    train_store = extract(train_root, tmp_path / "train.zarr", "--classes", names)
    val_store = extract(val_root, tmp_path / "val.zarr", "--classes", names)
    bare = extract(val_root, tmp_path / "bare.zarr")
    r = train(train_store, tmp_path / "run", "--val-store", str(val_store), "--iters", "20", "--batch-size", "3", *QUICK)
    assert r.exit_code == 0, r.output
    top1 = json.loads(r.stdout)["eval"]["avg/top1"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "eval" / "val" / "predictions.jsonl").read_text().splitlines()]
    assert [(x["label"], x["label_name"]) for x in lines] == [(0, "blue"), (0, "blue"), (1, "green"), (1, "green")]
    assert top1 == sum(x["pred"] == x["label"] for x in lines) / 4
    rep = CliRunner().invoke(main, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--per-class", "--json"])
    assert rep.exit_code == 0, rep.output
    (line,) = json.loads(rep.stdout)["leaderboard"]  # the views' mean only; per-view scores stay in results.csv
    assert set(line["metrics"]) == {"avg/top1", "avg/top5"} and line["value"] == top1 and line["n"] == 1
    table = (tmp_path / "rep" / "per_class.md").read_text()
    assert "#### classification: top-1 per class on val.zarr (%)" in table
    shown = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[4:] if line.startswith("| ")}
    want = {c: f"{100 * sum(x['pred'] == x['label'] for x in lines if x['label_name'] == c) / 2:.1f}" for c in ("blue", "green")}
    assert shown == want  # red has no validation sample: no row
    refused(train(train_store, tmp_path / "run2", "--val-store", str(bare), "--iters", "1", *QUICK),
            "has classes (2: blue, green) but the head was trained on (3: blue, green, red)")  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_store_read_by_dataloader_workers_is_the_same_one_line(tmp_path, workers):
    """The typed error a worker process raises reaches the user as the line it has in the main process."""
    path = build_label_store(tmp_path / "s.zarr", n=8)
    for level in ("p4", "p5"):
        for unit in range(2):
            f = layout.shard_file(path, f"features/{level}", unit, 5)
            f.write_bytes(f.read_bytes()[:-40])
    args = ["train-head", "--store", str(path), "--task", "classification", "--head", "linear", "--iters", "2", "--batch-size", "2"]
    r = CliRunner().invoke(main, [*args, "--num-workers", str(workers), "--device", "cpu", "--out", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert "is corrupt" in line or "bytes" in line
    assert "Traceback" not in r.output and "DataLoader worker" not in r.output and "Caught" not in r.output
