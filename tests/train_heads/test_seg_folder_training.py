"""Any segmentation set end to end: a 5-class `--dataset seg-folder` (classes.txt, splits as sub-folders, an ignore
index of 9, a class missing from both splits) extracted, a tiny UPerNet trained and evaluated: the head has 5 outputs,
the class names reach the per-class table, and ignored pixels count nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from seghelpers import sample

from fcache import store as fstore
from fcache.cli import main
from fcache.train_heads.evaluation import load_head

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("road", "photo", "disc", "rectangle", "sky")  # "road" and "sky" appear in no mask
IGNORE = 9
EXTRACT = ["--dataset", "seg-folder", "--random-init", "--model", "swinv2-t", "--input-size", "64", "--levels", "p2,p3,p4,p5"]
EXTRACT += ["--num-workers", "0", "--device", "cpu", "--ignore-index", str(IGNORE), "--json"]


def make_set(root: Path) -> dict[str, np.ndarray]:
    """root/classes.txt, root/{images,masks}/{train,val}/: the shapes of seghelpers with photo 1, disc 2, rectangle 3 and
    the unlabelled band as 9; returns the validation masks by key."""
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    val = {}
    for split, ks in (("train", range(4)), ("val", range(4, 6))):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for k in ks:
            im, label = sample(k)
            mask = np.where(label == 0, IGNORE, label).astype(np.uint8)
            Image.fromarray(im).save(root / "images" / split / f"s{k}.jpg", quality=95)
            Image.fromarray(mask).save(root / "masks" / split / f"s{k}.png")
            if split == "val":
                val[f"images/val/s{k}.jpg"] = mask
    return val


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("segfolder")
    masks = make_set(d / "set")
    for split in ("train", "val"):
        r = CliRunner().invoke(main, ["extract", *EXTRACT, "--root", str(d / "set"), "--split", split, "--out", str(d / f"{split}.zarr")])
        assert r.exit_code == 0, r.output
    args = ["train-head", "--task", "segmentation", "--store", str(d / "train.zarr"), "--val-store", str(d / "val.zarr")]
    args += ["--head", "upernet:channels=64", "--iters", "3", "--batch-size", "2", "--warmup", "0", "--lr", "1e-3"]
    args += ["--num-workers", "0", "--device", "cpu", "--log-every", "1", "--out", str(d / "run"), "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return d, masks, json.loads(r.stdout)


def test_the_store_holds_the_class_list_and_maps_the_ignore_index(trained):
    d, masks, _ = trained
    val = fstore.open(d / "val.zarr")
    assert val.manifest.dataset.label_names == CLASSES and val.manifest.dataset.task == "segmentation"
    assert val.manifest.dataset.source.ignore_index == IGNORE
    stored = np.asarray(val.target("segmentation"))
    assert set(np.unique(stored)) <= {1, 2, 3, 255} and {1, 2, 3, 255} <= set(np.unique(stored))
    for i, key in enumerate(val.keys):
        m = masks[key]
        np.testing.assert_array_equal(stored[i, : m.shape[0], : m.shape[1]], np.where(m == IGNORE, 255, m))


def test_the_head_has_one_output_per_class_and_ignored_pixels_count_nowhere(trained):
    d, masks, summary = trained
    head = load_head(d / "run")
    assert head.task.label_names == CLASSES and head.model.cls[1].out_channels == len(CLASSES) == 5
    config = json.loads((d / "run" / "config.json").read_text())
    assert config["task"]["label_names"] == list(CLASSES)
    labels = d / "run" / "eval" / "val" / "labels"
    correct = total = 0
    for key, m in masks.items():
        pred = np.asarray(Image.open(labels / f"{key.replace('/', '__').removesuffix('.jpg')}.png"))
        assert pred.shape == m.shape and pred.max() < 5
        keep = m != IGNORE
        correct += int((pred[keep] == m[keep]).sum())
        total += int(keep.sum())
    assert total < sum(m.size for m in masks.values())  # the band was there, and left out
    assert summary["eval"]["ss/aAcc"] == pytest.approx(correct / total)


def test_class_names_reach_the_per_class_table(trained, tmp_path):
    d, _, summary = trained
    report = json.loads((d / "run" / "eval" / "val" / "segmentation.json").read_text())
    assert [c["class"] for c in report["single_scale"]["classes"]] == list(CLASSES)
    assert report["single_scale"]["classes"][4]["IoU"] is None or report["single_scale"]["classes"][4]["IoU"] == 0.0  # sky: no pixel
    r = CliRunner().invoke(main, ["report", str(d / "run"), "--out", str(tmp_path / "rep"), "--per-class"])
    assert r.exit_code == 0, r.output
    section = r.output.split("#### segmentation: ss IoU per class on val.zarr (%)")[1]
    rows = [line.split("|")[1].strip() for line in section.strip().splitlines()[2:] if line.startswith("| ")]
    assert rows[:5] == list(CLASSES)
    disc = next(c["IoU"] for c in report["single_scale"]["classes"] if c["class"] == "disc")
    assert "| disc " in section and (f"{100 * disc:.1f}" in section.split("| disc")[1].splitlines()[0])
    assert f"{100 * summary['eval']['ss/mIoU']:.1f}" in r.output.split("#### ")[0]  # the leaderboard's ss/mIoU
