"""`fcache train-head --task segmentation` / `fcache eval` refuse what cannot work: one line, exit code 2, nothing written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fcache.cli import main
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--iters", "1", "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]


def train(store, out, head, *extra, task="segmentation"):
    args = ["train-head", "--task", task, "--store", str(store), "--out", str(out), "--head", head, *TINY, *extra]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    ("store", "head", "task", "fragments"),
    [
        ("det", "upernet", "segmentation", ("no 'segmentation' targets", "detection store", "--dataset ade20k")),
        ("seg", "fpn", "detection", ("no 'annotations' targets", "segmentation store", "--task detection")),
        ("seg", "fpn", "segmentation", ("unknown head 'fpn' for segmentation", "mask2former, upernet")),
        ("seg", "upernet:neck=fpn,layers=3", "segmentation", ("layers=3 applies to neck=bifpn only",)),
        ("seg", "upernet:levels=p5", "segmentation", ("needs at least 2 feature levels", "only p5")),
        ("seg", "mask2former:levels=p1+p2", "segmentation", ("levels='p1+p2' must be 'all' or distinct level names",)),
        ("det345", "mask2former:levels=p2+p3", "segmentation", ("no 'segmentation' targets",)),
        ("seg", "mask2former:channels=48", "segmentation", ("channels=48 must be divisible by 32",)),
        ("seg", "upernet", "pose", ("unknown task 'pose'", "detection", "segmentation")),
        ("seg", "linear", "depth", ("no 'depth' targets", "segmentation store", "--dataset depth-folder")),
    ],
)
def test_train_head_refuses(store, head, task, fragments, seg_stores, det_store, det_store_p345, tmp_path):
    path = {"seg": seg_stores[0], "det": det_store, "det345": det_store_p345}[store]
    refused(train(path, tmp_path / "run", head, task=task), *fragments)
    assert not (tmp_path / "run").exists()


def test_validation_needs_the_plain_view(seg_stores, tmp_path):
    train_store, _ = seg_stores  # its views are random crops and flips
    r = train(train_store, tmp_path / "run", "upernet:channels=64", "--val-store", str(train_store))
    refused(r, "is a random crop or flip, not the plain resize + pad", "--views 1")
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_store_of_another_task(seg_stores, det_store, tmp_path):
    out = tmp_path / "run"
    assert train(seg_stores[0], out, "upernet:channels=64").exit_code == 0
    args = ["--num-workers", "0", "--device", "cpu"]
    refused(CliRunner().invoke(main, ["eval", str(out), "--store", str(det_store), *args]), "no 'segmentation' targets")
    assert not (out / "eval").exists()
