"""Training and evaluating heads from stores in S3 (copied there from disk): the same weights and metrics as from disk."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_cls_probe import QUICK, colour_images, extract, train

from fcache.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_train_and_eval_from_s3_equal_from_disk(tmp_path, s3_bucket):
    local = {
        "train": extract(colour_images(tmp_path / "train", 6, seed=0), tmp_path / "train.zarr"),
        "val": extract(colour_images(tmp_path / "val", 3, seed=1), tmp_path / "val.zarr", "--test-views", "flip"),
    }
    remote = {}
    for name, path in local.items():
        remote[name] = f"{s3_bucket}/{name}.zarr"
        assert CliRunner().invoke(main, ["copy", str(path), remote[name]]).exit_code == 0
    flags = ["--iters", "6", "--batch-size", "4", *QUICK]
    r = train(local["train"], tmp_path / "run-local", "--val-store", str(local["val"]), *flags)
    assert r.exit_code == 0, r.output
    cache = ["--cache-dir", str(tmp_path / "cache"), "--cache-size", "1GB"]
    r2 = train(remote["train"], tmp_path / "run-s3", "--val-store", remote["val"], *flags, *cache)  # in-process loader: prefetch thread
    assert r2.exit_code == 0, r2.output
    a, b = load_file(tmp_path / "run-local" / "model.safetensors"), load_file(tmp_path / "run-s3" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(r.stdout)["eval"] == json.loads(r2.stdout)["eval"]
    assert any((tmp_path / "cache").rglob("c*"))  # the shards read were cached
    e = CliRunner().invoke(main, ["eval", str(tmp_path / "run-s3"), "--store", remote["val"], "--num-workers", "2", "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.stdout)["metrics"] == json.loads(r.stdout)["eval"]
    assert "storage_options" not in json.loads((tmp_path / "run-s3" / "config.json").read_text())["config"]
