"""Training detection heads from a store: overfitting a tiny dataset, `fcache eval` against pycocotools, bit-exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dethelpers import CATEGORIES, OBJECTS, ORIG_H, ORIG_W, build_detection_store
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file

from fcache import store as fstore
from fcache.cli import main
from fcache.train_heads import RunDir, TrainConfig, run_train, train
from fcache.train_heads.training import prepare_training, train_indices, training_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread beats two contended ones

FIT = ["--head", "fpn:channels=32,rois=32,rpn_batch=32", "--iters", "100", "--batch-size", "2", "--lr", "1e-3", "--warmup", "10"]
QUICK = ["--num-workers", "0", "--device", "cpu", "--log-every", "10", "--json"]


@pytest.fixture(scope="module")
def fitted(det_store, tmp_path_factory):
    """A head trained to overfit the two training images, evaluated on them at the end."""
    out = tmp_path_factory.mktemp("fit") / "run"
    r = CliRunner().invoke(main, ["train-head", "--store", str(det_store), "--val-store", str(det_store), "--out", str(out), *FIT, *QUICK])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@pytest.mark.slow
def test_overfits_the_training_images(fitted):
    out, summary = fitted
    assert summary["iters"] == {"start": 0, "stop": 100, "total": 100}
    assert summary["eval"]["box/AP50"] >= 0.9, summary["eval"]
    assert summary["eval"]["mask/AP50"] >= 0.5, summary["eval"]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["head"] == "fpn:channels=32,rois=32,rpn_batch=32" and config["task"]["head"].startswith(
        "fpn:channels=32,levels=all"
    )
    weights = load_file(str(out / "model.safetensors"))  # fpn + Mask R-CNN heads hold no buffers: every tensor is trained
    assert config["trainable_params"] == summary["trainable_params"] == sum(w.numel() for w in weights.values())


def _ground_truth_file(store_path, path):
    """The COCO json of the store's images, written straight from its targets (as a user would)."""
    s = fstore.open(store_path)
    images = [json.loads(s.target("image", i)) for i in range(s.n)]
    anns = [a for i in range(s.n) for a in json.loads(s.target("annotations", i))]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": s.target_attrs["categories"]}))
    return str(path)


def test_eval_matches_pycocotools_on_the_written_detections(fitted, det_store, tmp_path):
    out, summary = fitted
    r = CliRunner().invoke(main, ["eval", str(out), "--store", str(det_store), "--num-workers", "0", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["iter"] == 100 and got["samples"] == 2
    assert got["metrics"] == summary["eval"]  # the same weights scored twice

    gt = COCO(_ground_truth_file(det_store, tmp_path / "gt.json"))
    detections = json.loads((out / "eval" / "train" / "detections.json").read_text())
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        dets = detections if iou_type == "bbox" else [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        assert {n: got["metrics"][f"{prefix}/{n}"] for n in names} == dict(zip(names, map(float, ev.stats[:6]), strict=True))


def test_detections_are_in_original_image_coordinates(fitted):
    out, _ = fitted
    detections = json.loads((out / "eval" / "train" / "detections.json").read_text())
    assert {d["image_id"] for d in detections} == {1, 2}
    assert {d["category_id"] for d in detections} <= {c["id"] for c in CATEGORIES}
    for d in detections:
        x, y, w, h = d["bbox"]
        assert x >= 0 and x + w <= ORIG_W + 1e-3 and y >= 0 and y + h <= ORIG_H + 1e-3
        assert d["segmentation"]["size"] == [ORIG_H, ORIG_W]
    for image_id, objects in enumerate(OBJECTS, start=1):
        for cat, *box in objects:
            cands = [d for d in detections if d["image_id"] == image_id and d["category_id"] == cat]
            best = max(cands, key=lambda d: d["score"] * mask_utils.iou([d["bbox"]], [box], [0])[0, 0])
            assert mask_utils.iou([best["bbox"]], [box], [0])[0, 0] > 0.75, (image_id, box, best["bbox"])


def _config(store, out, **kw):
    base = dict(
        store=str(store),
        out=str(out),
        head="bifpn:layers=1,roi=cascade,channels=32,rois=16,rpn_batch=16",
        iters=6,
        batch_size=2,
        lr=1e-3,
        warmup=2,
    )
    return TrainConfig(**{**base, "num_workers": 0, "device": "cpu", "log_every": 1, "checkpoint_every": 100, **kw})


def test_resume_continues_bit_exactly(det_store, tmp_path):
    """With EMA, gradient accumulation and evaluations every 2 iterations (best checkpoint, patience count) too."""
    extra = dict(ema=0.8, grad_accum=2, val_store=str(det_store), eval_every="2", patience=5, logger="none")
    run_train(_config(det_store, tmp_path / "straight", **extra), progress=False)
    first = run_train(_config(det_store, tmp_path / "split", stop_at=3, **extra), progress=False)
    at3 = load_file(str(tmp_path / "split" / "model.safetensors"))
    second = run_train(_config(det_store, tmp_path / "split", resume=True, num_workers=2, **extra), progress=False)  # any workers
    assert (first["iters"]["stop"], second["iters"]["start"], second["iters"]["stop"]) == (3, 3, 6)

    for name in ("model.safetensors", "best.safetensors"):
        straight = load_file(str(tmp_path / "straight" / name))
        split = load_file(str(tmp_path / "split" / name))
        assert straight.keys() == split.keys()
        assert all(torch.equal(straight[k], split[k]) for k in straight), name
    assert not all(torch.equal(straight[k], at3[k]) for k in straight)  # iterations 4-6 did change the weights
    a, b = (torch.load(tmp_path / name / "checkpoint-6.pt", weights_only=True) for name in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the raw weights, beside the EMA's
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]) and a["validation"] == b["validation"]
    assert a["validation"]["last_iter"] == 6 and first["eval"] is not None and second["best"] == run_summary_best(tmp_path / "straight")
    log = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = log("straight"), log("split")
    assert [r["iter"] for r in b] == [1, 2, 2, 3, 4, 4, 5, 6, 6]  # training records, and evaluations at 2, 4, 6
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("box/AP") for r in a] == [r.get("box/AP") for r in b]


def run_summary_best(run) -> dict:
    """The best evaluation of a RUN folder's metrics.jsonl (the first of the highest box AP)."""
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "eval"]
    best = max(evals, key=lambda r: (r["box/AP"], -r["iter"]))
    return {"metric": "box/AP", "value": best["box/AP"], "iter": best["iter"]}


def test_evaluating_during_training_changes_nothing_it_trains(det_store, tmp_path):
    """Evaluation draws from the global RNG (the DataLoader's seed) between steps that sample RoIs from it: the head's own
    RNG state is what it trains on, so the weights are those of a run never evaluated."""
    plain = run_train(_config(det_store, tmp_path / "plain", iters=3, logger="none"), progress=False)
    evaluated = run_train(_config(det_store, tmp_path / "eval", iters=3, val_store=str(det_store), eval_every="1", logger="none"),
                          progress=False)  # fmt: skip
    assert plain["final_loss"] == evaluated["final_loss"] and "eval" in evaluated
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "eval"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_fraction_is_a_seeded_subset(tmp_path):
    s = fstore.open(build_detection_store(tmp_path / "eight.zarr", objects=OBJECTS * 4, failed=(2,), views=1))
    a, b, c = train_indices(s, 0.5, 0), train_indices(s, 0.5, 0), train_indices(s, 0.5, 1)
    assert len(a) == round(0.5 * 7) and 2 not in a and list(a) == sorted(a)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(train_indices(s, 0.01, 0)) == 1
    np.testing.assert_array_equal(train_indices(s, 1.0, 0), [0, 1, 3, 4, 5, 6, 7])


def test_the_loop_takes_items_from_any_dataset(tmp_path):
    """A plain list of FeatureDataset-shaped items (as online features would be) trains exactly like the store."""
    store = build_detection_store(tmp_path / "one-view.zarr", views=1)
    run_train(_config(store, tmp_path / "from-store", iters=3), progress=False)
    cfg = _config(store, tmp_path / "from-list", iters=3)
    p = prepare_training(cfg)
    items = [training_data(p, cfg.seed)[j] for j in range(len(p.indices))]
    result = train(cfg, p.task, p.model, items, RunDir(cfg.out), progress=False)
    assert (result.start, result.stop) == (0, 3)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("from-store", "from-list"))
    assert all(torch.equal(a[k], b[k]) for k in a)
