"""Predict equals eval: `fcache predict` on images (the frozen backbone rebuilt from the RUN's record, online) gives the
predictions `fcache eval` gives from an fp32 store extracted from the same images, for every task; and what predict
refuses. The measured differences are written to FIGURES (printed with -s)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fcache import store as fstore
from fcache.cli import main
from fcache.common.outputs import output_names
from fcache.train_heads.segmentation.labelmaps import read_label_png
from helpers import refused
from media import coco_dataset, image_folder

sys.path.insert(0, str(Path(__file__).parents[1] / "train_heads"))
from seghelpers import make_ade  # noqa: E402
from videohelpers import motion_folder  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),  # pycocotools
]
BACKBONE = ["--model", "swinv2-t", "--random-init", "--input-size", "128", "--dtype", "fp32", "--num-workers", "0", "--device", "cpu"]
CPU = ["--num-workers", "0", "--device", "cpu"]
FIGURES: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: extraction and prediction then run the very same kernels."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    print("\npredict vs eval:", json.dumps(FIGURES, indent=1))


def cli(*args: str) -> dict:
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def extract(out: Path, *flags: str) -> Path:
    cli("extract", *flags, *BACKBONE, "--out", str(out))
    return out


def train_and_eval(store: Path, run: Path, task: str, head: str, batch: int, *extra: str) -> dict:
    cli("train-head", "--store", str(store), "--task", task, "--head", head, "--out", str(run), "--iters", "4", "--batch-size", "2",
        "--warmup", "1", *extra, *CPU)  # fmt: skip
    return cli("eval", str(run), "--store", str(store), "--batch-size", str(batch), *CPU)


def test_detection_predictions_equal_eval(tmp_path):
    images, ann = coco_dataset(tmp_path / "coco", n=4)
    store = extract(tmp_path / "det.zarr", "--dataset", "coco", "--root", str(images), "--annotations", str(ann), "--batch-size", "2")
    summary = train_and_eval(store, tmp_path / "run", "detection", "fpn:channels=16,rois=16,rpn_batch=16", 2, "--lr", "1e-3")
    evaluated = json.loads((Path(summary["out"]) / "detections.json").read_text())
    out = tmp_path / "pred"
    cli("predict", str(tmp_path / "run"), str(images), "--out", str(out), "--random-init", "--score-thr", "0", "--batch-size", "2",
        "--annotations", str(ann), "--draw", *CPU[2:])  # fmt: skip
    predicted = json.loads((out / "predictions.json").read_text())
    assert len(predicted) == len(evaluated) > 0
    names = {int(im["id"]): im["file_name"] for im in json.loads(ann.read_text())["images"]}
    box = score = 0.0
    for e in evaluated:
        same = [p for p in predicted if p["image_id"] == e["image_id"] and p["category_id"] == e["category_id"]]
        p = min(same, key=lambda p: float(np.abs(np.subtract(p["bbox"], e["bbox"])).max()) + abs(p["score"] - e["score"]))
        box, score = max(box, float(np.abs(np.subtract(p["bbox"], e["bbox"])).max())), max(score, abs(p["score"] - e["score"]))
        assert p["segmentation"] == e["segmentation"]  # masks identical
        assert Path(p["file_name"]).name == names[e["image_id"]] and p["category_name"] in ("square", "disc")
    assert box <= 1e-4 and score <= 1e-4
    FIGURES["detection"] = {"detections": len(evaluated), "max_box_diff_px": box, "max_score_diff": score, "masks_identical": 1.0}
    assert {p.name for p in (out / "overlays").iterdir()} == {f"{k:03d}.png" for k in range(4)}

    # the cache path: the store as input, no backbone; the ground truth drawn beside the predictions
    cached = tmp_path / "cached"
    cli("predict", str(tmp_path / "run"), str(store), "--out", str(cached), "--score-thr", "0", "--batch-size", "2", "--draw", *CPU[2:])
    from_store = json.loads((cached / "predictions.json").read_text())
    assert [{k: v for k, v in d.items() if k not in ("file_name", "category_name")} for d in from_store] == evaluated
    assert all(d["file_name"] == names[d["image_id"]] for d in from_store)  # the image's file name, not the store's key
    overlays = sorted((cached / "overlays").iterdir())
    assert len(overlays) == 4 and Image.open(overlays[0]).width > 2 * 512  # prediction and ground truth side by side


def test_segmentation_label_maps_equal_eval_with_test_views(tmp_path):
    root = make_ade(tmp_path / "ADE", "validation", n=3)
    store = extract(tmp_path / "seg.zarr", "--dataset", "ade20k", "--root", str(root), "--split", "validation", "--test-views", "flip,ms",
                    "--batch-size", "1")  # fmt: skip
    summary = train_and_eval(store, tmp_path / "run", "segmentation", "upernet:channels=64", 1)
    out = tmp_path / "pred"
    images = root / "images" / "validation"
    cli("predict", str(tmp_path / "run"), str(images / "*.jpg"), "--out", str(out), "--random-init", "--test-views", "flip,ms",
        "--batch-size", "1", "--draw", *CPU[2:])  # fmt: skip
    equal = []
    keys = [str(k) for k in fstore.open(store).keys]
    for key, name in zip(keys, output_names(keys), strict=True):
        evaluated = read_label_png(Path(summary["out"]) / "labels" / f"{name}.png")
        predicted = read_label_png(out / "labels" / f"{Path(str(key)).stem}.png")
        assert predicted.shape == evaluated.shape  # original resolution
        equal.append(float((predicted == evaluated).mean()))
    assert equal == [1.0] * 3
    FIGURES["segmentation"] = {"images": 3, "views": 6, "pixels_equal": min(equal)}
    assert len(list((out / "overlays").iterdir())) == 3


def _label_records(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}


def _compare_labels(evaluated: dict[str, dict], predicted: dict[str, dict], task: str) -> None:
    assert evaluated.keys() == predicted.keys() and evaluated
    diff = 0.0
    for name, e in evaluated.items():
        p = predicted[name]
        assert p["top5"] == e["top5"] and p["views"] == e["views"]
        diff = max(diff, float(np.abs(np.subtract(p["top5_scores"], e["top5_scores"])).max()))
    assert diff <= 1e-4
    FIGURES[task] = {"inputs": len(evaluated), "max_score_diff": diff}


def test_classification_predictions_equal_eval_with_test_views(tmp_path):
    folder = image_folder(tmp_path / "imgs", n=6)
    store = extract(tmp_path / "cls.zarr", "--dataset", "folder", "--root", str(folder), "--levels", "p5", "--test-views", "flip",
                    "--batch-size", "2")  # fmt: skip
    summary = train_and_eval(store, tmp_path / "run", "classification", "linear", 2, "--lr", "1e-2")
    out = tmp_path / "pred"
    cli("predict", str(tmp_path / "run"), str(folder), "--out", str(out), "--random-init", "--test-views", "flip", "--batch-size", "2",
        "--top-k", "2", *CPU[2:])  # fmt: skip
    predicted = _label_records(out / "predictions.jsonl")
    _compare_labels(_label_records(Path(summary["out"]) / "predictions.jsonl"), predicted, "classification")
    assert all(len(r["top"]) == 2 and r["top"][0]["name"] in ("cats", "dogs") for r in predicted.values())


def test_video_predictions_equal_eval(tmp_path):
    clips = motion_folder(tmp_path / "clips", 2, seed=0)
    flags = ["--dataset", "video", "--root", str(clips), "--frames", "8", "--clips", "2", "--levels", "p5", "--batch-size", "4"]
    store = extract(tmp_path / "video.zarr", *flags)
    summary = train_and_eval(store, tmp_path / "run", "video", "temporal:blocks=1,dim=32", 2)
    out = tmp_path / "pred"
    cli("predict", str(tmp_path / "run"), str(clips), "--out", str(out), "--random-init", "--batch-size", "4", *CPU[2:])
    evaluated = _label_records(Path(summary["out"]) / "predictions.jsonl")
    _compare_labels(evaluated, _label_records(out / "predictions.jsonl"), "video")
    cli("predict", str(tmp_path / "run"), str(store), "--out", str(tmp_path / "cached"), *CPU[2:])
    cached = _label_records(tmp_path / "cached" / "predictions.jsonl")
    assert {k: r["label"] for k, r in cached.items()} == {k: r["label"] for k, r in evaluated.items()}  # the store's labels
    assert min(r["label"] for r in cached.values()) >= 0


def test_predict_refuses_the_wrong_backbone_flags_and_writes_nothing_into_run(tmp_path):
    folder = image_folder(tmp_path / "imgs", n=2)
    store = extract(tmp_path / "cls.zarr", "--dataset", "folder", "--root", str(folder), "--levels", "p5")
    run = tmp_path / "run"
    cli("train-head", "--store", str(store), "--task", "classification", "--head", "linear", "--out", str(run), "--iters", "1",
        "--batch-size", "2", *CPU)  # fmt: skip
    before = sorted(p.name for p in run.iterdir())
    args = ["predict", str(run), str(folder), "--out", str(tmp_path / "p"), "--device", "cpu"]
    refused(CliRunner().invoke(main, args), "random-init backbone (seed 0)", "--random-init")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    refused(CliRunner().invoke(main, [*args, "--weights", str(weights)]), "not of a weights file", "drop --weights")
    refused(CliRunner().invoke(main, [*args, "--random-init", "--clips", "2"]), "--clips and --crops are for video heads")
    refused(CliRunner().invoke(main, [*args[:2], str(tmp_path / "nothing"), *args[3:], "--random-init"]), "no such file")
    assert sorted(p.name for p in run.iterdir()) == before
