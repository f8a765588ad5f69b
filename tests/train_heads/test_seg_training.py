"""Training segmentation heads from extracted stores: overfitting a tiny set, one-iteration fidelity (store vs online), `fcache eval`
with single-scale and ms+flip scores, per-class IoU in RUN."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from seghelpers import PHOTOS

from fcache import store as fstore
from fcache.cli import main
from fcache.extract.online import OnlineFeatures
from fcache.train_heads import RunDir, TrainConfig, run_train, train
from fcache.train_heads.segmentation.task import SEGMENTATION_JSON
from fcache.train_heads.training import prepare_training, training_data

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--num-workers", "0", "--device", "cpu", "--json"]
UPERNET = ["--head", "upernet:channels=64", "--iters", "100", "--batch-size", "4", "--lr", "1e-2", "--warmup", "0", "--log-every", "20"]
MASK2FORMER = ["--head", "mask2former:channels=64,queries=16", "--iters", "60", "--batch-size", "4", "--lr", "1e-3", "--log-every", "20"]


def fit(stores, out, flags):
    train_store, val_store = stores
    args = ["train-head", "--task", "segmentation", "--store", str(train_store), "--val-store", str(val_store), "--out", str(out)]
    r = CliRunner().invoke(main, [*args, *flags, *QUICK])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def upernet_run(seg_stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("upernet") / "run"
    return out, fit(seg_stores, out, UPERNET)


@pytest.mark.slow
def test_upernet_overfits_the_tiny_set(upernet_run):
    out, summary = upernet_run
    assert summary["eval"]["ss/mIoU"] >= 0.8, summary["eval"]
    assert summary["eval"]["ms+flip/mIoU"] >= 0.5, summary["eval"]  # scales 0.5 and 0.75 were never trained on
    losses = [r["loss"] for r in RunDir(out).metrics() if "loss" in r]
    assert len(losses) == 5 and losses[-1] < 0.2 * losses[0]
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["label_names"][:3] == ["wall", "building", "sky"] and len(config["task"]["label_names"]) == 150
    given = {k: config["config"][k] for k in ("lr", "warmup", "schedule", "weight_decay", "warmup_factor")}
    assert given == {"lr": 1e-2, "warmup": 0, "schedule": "linear", "weight_decay": 0.05, "warmup_factor": 1e-6}  # Table 12 fills the rest


@pytest.mark.slow
def test_mask2former_overfits_the_tiny_set(seg_stores, tmp_path):
    summary = fit(seg_stores, tmp_path / "run", MASK2FORMER)
    assert summary["losses"].keys() == {"ce", "mask", "dice", "loss"}
    assert summary["eval"]["ss/mIoU"] >= 0.8, summary["eval"]
    assert summary["eval"]["ms+flip/mIoU"] >= 0.5, summary["eval"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (config["weight_decay"], config["warmup"], config["schedule"]) == (0.02, 0, "linear")  # Table 12, frozen Mask2Former


def test_eval_prints_single_scale_and_ms_flip(upernet_run, seg_stores):
    out, summary = upernet_run
    _, val = seg_stores
    r = CliRunner().invoke(main, ["eval", str(out), "--store", str(val), "--num-workers", "0", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["iter"] == 100 and got["samples"] == len(PHOTOS)
    assert got["metrics"] == summary["eval"]  # the same weights scored twice
    assert set(got["metrics"]) == {f"{f}/{m}" for f in ("ss", "ms+flip") for m in ("mIoU", "mAcc", "aAcc")}
    text = CliRunner().invoke(main, ["eval", str(out), "--store", str(val), "--num-workers", "0", "--device", "cpu"])
    assert text.exit_code == 0 and "ss    mIoU" in text.stdout and "ms+flip mIoU" in text.stdout, text.output


def test_per_class_iou_and_per_view_scores_are_written(upernet_run, seg_stores):
    out, summary = upernet_run
    report = json.loads((out / "eval" / "val" / SEGMENTATION_JSON).read_text())
    assert report["views"] == list(fstore.open(seg_stores[1]).manifest.view_names)
    assert report["views"] == ["plain", "flip", "s0.5", "s0.5+flip", "s0.75", "s0.75+flip"]
    classes = report["single_scale"]["classes"]
    assert len(classes) == 150 and [c["class"] for c in classes[:3]] == ["wall", "building", "sky"]
    present = [c["IoU"] for c in classes[:3]]
    assert all(iou is not None and 0 < iou <= 1 for iou in present)
    assert report["single_scale"]["mIoU"] == pytest.approx(summary["eval"]["ss/mIoU"])
    assert report["ms+flip"]["mIoU"] == pytest.approx(summary["eval"]["ms+flip/mIoU"])
    views = report["per_view_mIoU"]
    assert views["plain"] == pytest.approx(summary["eval"]["ss/mIoU"])
    assert views["flip"] >= 0.7 and views["s0.75+flip"] >= 0.5, views  # mirrored and smaller views map back correctly


@pytest.mark.parametrize("head", ["upernet:channels=64,aux=1", "mask2former:channels=32,queries=8,pixel_blocks=2,decoder_blocks=2"])
def test_one_iteration_from_the_store_equals_one_on_features_computed_online(seg_stores, head, tmp_path):
    """The fidelity test for segmentation: one step read from an fp32 store gives the same weights as one step on
    features the same frozen backbone computes online from the raw images (same samples, views, seed)."""

    def config(name):
        return TrainConfig(
            store=str(seg_stores[0]), out=str(tmp_path / name), head=head, task="segmentation", iters=1, batch_size=4, lr=1e-3, warmup=0,
            num_workers=0, device="cpu",
        )  # fmt: skip

    run_train(config("from-store"), progress=False, say=lambda _: None)
    cfg = config("online")
    p = prepare_training(cfg)
    start = {k: v.clone() for k, v in p.model.state_dict().items()}
    online = OnlineFeatures.from_dataset(training_data(p, cfg.seed, levels=()), tuple(lv.name for lv in p.levels))
    assert online[0]["features"]["p2"].dtype == torch.float32
    train(cfg, p.task, p.model, online, RunDir(cfg.out), progress=False)
    a, b = RunDir(tmp_path / "from-store").load_model()[0], p.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(start[k], b[k]) for k in b)  # the step did move the weights
