"""`fcache train-head` / `fcache eval` refuse what cannot work: one line, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from dethelpers import LEVELS, build_detection_store

from fcache.cli import main
from helpers import refused

TINY = ["--head", "fpn:channels=32,rois=8,rpn_batch=8", "--iters", "1", "--batch-size", "1", "--num-workers", "0", "--device", "cpu"]


def train(store, out, *extra, head=None):
    args = ["train-head", "--store", str(store), "--out", str(out), *TINY, *extra]
    if head is not None:
        args[args.index("--head") + 1] = head
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return {
        "classification": build_detection_store(d / "cls.zarr", with_annotations=False),
        "one-level": build_detection_store(d / "p5.zarr", levels=LEVELS[3:]),
        "all-failed": build_detection_store(d / "failed.zarr", failed=(0, 1)),
        "cropped": build_detection_store(d / "cropped.zarr", crop_first_view=True),
    }


@pytest.mark.parametrize(
    ("case", "head", "fragments"),
    [
        ("classification", None, ("no 'annotations' targets", "classification store", "--task detection")),
        ("one-level", None, ("at least 2 feature levels", "only p5")),
        ("all-failed", None, ("no usable samples", "decode_error: 2")),
        ("p345", "fpn:levels=p2+p3", ("reads levels p2, p3", "holds only p3, p4, p5")),
        ("p345", "bifpn:layer=3", ("unknown key 'layer'", "layers")),
        ("p345", "bifpn:layers=0", ("layers=0 must be at least 1",)),
        ("p345", "fpn:roi=fancy", ("roi='fancy' is not one of standard, cascade, htc",)),
        ("p345", "retinanet", ("unknown head 'retinanet' for detection", "bifpn, fpn, fpn-res")),
        ("p345", "fpn:norm=gn", ("unknown key 'norm'",)),
    ],
)
def test_train_head_refuses(case, head, fragments, stores, det_store_p345, tmp_path):
    store = det_store_p345 if case == "p345" else stores[case]
    refused(train(store, tmp_path / "run", head=head), *fragments)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_holds_one_configuration(det_store, tmp_path):
    out = tmp_path / "run"
    assert train(det_store, out).exit_code == 0
    config = (out / "config.json").read_bytes()
    refused(train(det_store, out, "--lr", "1e-3"), "holds a run of another configuration", "lr: 0.0003 != 0.001")
    refused(train(det_store, out), "already holds this run (at iteration 1)", "--resume")
    assert (out / "config.json").read_bytes() == config
    # operational flags may change, and the head may be spelled differently (defaults written out)
    ok = train(
        det_store, out, "--resume", "--num-workers", "1", "--json", head="fpn:channels=32,rois=8,rpn_batch=8,roi=standard,levels=all"
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["iters"] == {"start": 1, "stop": 1, "total": 1}


def test_not_a_run_folder(det_store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    refused(train(det_store, tmp_path), "is not an fcache run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_eval_refuses_stores_that_do_not_fit(det_store, det_store_p345, stores, tmp_path):
    out = tmp_path / "run"
    assert train(det_store, out).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    refused(CliRunner().invoke(main, ["eval", str(out), "--store", str(det_store_p345)]), "lacks level(s) p2")
    refused(CliRunner().invoke(main, ["eval", str(out), "--store", str(stores["classification"])]), "no 'annotations' targets")
    refused(CliRunner().invoke(main, ["eval", str(out), "--store", str(stores["cropped"])]), "view 0 of 2 sample(s) is a random crop")
    refused(CliRunner().invoke(main, ["eval", str(tmp_path), "--store", str(det_store)]), "is not an fcache run folder")
    assert sorted(p.name for p in out.iterdir()) == before


def test_val_store_is_checked_before_training(det_store, stores, tmp_path):
    refused(train(det_store, tmp_path / "run", "--val-store", str(stores["classification"])), "no 'annotations' targets")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal only happens without a CUDA device")
def test_cuda_without_a_device_is_refused_before_writing(det_store, tmp_path):
    refused(train(det_store, tmp_path / "run", "--device", "cuda"), "no CUDA device")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", ["flag", "config", "sweep"])
def test_a_batch_larger_than_the_training_set_is_refused_at_once(given, det_store, tmp_path):
    """It would sit at 0% while the batch of repeated samples grows in memory: refused before anything is written."""
    out = tmp_path / "run"
    head = TINY[TINY.index("--head") + 1]
    if given == "sweep":
        spec = tmp_path / "s.yaml"
        spec.write_text(json.dumps({"store": str(det_store), "head": head, "iters": 1, "batch_size": [1, 1e11], "device": "cpu"}))
        r = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(out)])
    else:
        settings = tmp_path / "settings.json"
        settings.write_text(json.dumps({"batch_size": 1e11}))
        size = ["--config", str(settings)] if given == "config" else ["--batch-size", "1000000"]
        at = TINY.index("--batch-size")
        base = TINY[:at] + TINY[at + 2 :]
        r = CliRunner().invoke(main, ["train-head", "--store", str(det_store), "--out", str(out), *base, *size])
    batch = "1000000" if given == "flag" else "100000000000"
    refused(r, f"--batch-size {batch} is larger than the training set (2 samples); give --batch-size 2 or less")
    assert not out.exists()
