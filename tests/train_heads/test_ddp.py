"""One head on several processes (torchrun, gloo on CPU): each rank trains its slice of every global batch and the
result matches single-process training with the same global batch; rank 0 alone writes the RUN folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clshelpers import build_label_store
from safetensors.torch import load_file

from fcache.train_heads import TrainConfig, run_train
from fcache.train_heads.data import TrainBatches
from fcache.train_heads.distributed import Dist, check_batch, own_rng

FLAGS = ["--task", "classification", "--head", "linear", "--iters", "4", "--batch-size", "4", "--lr", "0.05", "--warmup", "1"]
FLAGS += ["--num-workers", "0", "--device", "cpu", "--log-every", "1", "--json"]


@pytest.fixture(scope="module")
def label_store(tmp_path_factory):
    return build_label_store(tmp_path_factory.mktemp("labels") / "labels.zarr")


def torchrun(store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fcache", "train-head"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "--store", str(store), "--out", str(out), *FLAGS, *extra], capture_output=True, text=True, env=env)


def test_rank_slices_make_up_the_global_batch():
    whole = list(TrainBatches(10, 4, seed=3, start=0, stop=6))
    ranks = [list(TrainBatches(10, 4, seed=3, start=0, stop=6, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == whole
    assert all(len(b) == 2 for b in ranks[0])
    with pytest.raises(ValueError, match="does not split evenly over 2 processes; use a multiple of 2"):
        check_batch(3, Dist(0, 2, 0))
    assert Dist.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Dist(1, 2, 1)
    assert Dist.from_env({}) == Dist()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(label_store, tmp_path):
    """torchrun x 2 to iteration 2, resumed by torchrun x 2 to 4, against one process straight to 4; with gradient
    accumulation, an EMA and evaluations every 2 iterations (rank 0 evaluates, the others wait)."""
    single = tmp_path / "single"
    cfg = TrainConfig(store=str(label_store), out=str(single), task="classification", head="linear", iters=4, batch_size=4,
                      lr=0.05, warmup=1, num_workers=0, device="cpu", log_every=1, schedule="cosine", weight_decay=0.0,
                      grad_accum=2, ema=0.5, val_store=str(label_store), eval_every="2", logger="none")  # fmt: skip
    run_train(cfg, progress=False, say=lambda m: None)
    flags = ["--schedule", "cosine", "--weight-decay", "0", "--grad-accum", "2", "--ema", "0.5", "--val-store", str(label_store)]
    flags += ["--eval-every", "2", "--logger", "none"]
    first = torchrun(label_store, tmp_path / "ddp", *flags, "--stop-at", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)  # rank 0 alone prints
    assert summary["processes"] == 2 and summary["iters"] == {"start": 0, "stop": 2, "total": 4}
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint-2.pt", weights_only=True)
    assert len(checkpoint["rng_ranks"]) == 2 and checkpoint["validation"]["last_iter"] == 2
    at2 = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    second = torchrun(label_store, tmp_path / "ddp", *flags, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout)["iters"] == {"start": 2, "stop": 4, "total": 4}

    for name in ("model.safetensors", "best.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(tmp_path / "ddp" / name))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), {k: (a[k] - b[k]).abs().max() for k in a}
    final = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert not all(torch.allclose(at2[k], final[k]) for k in at2)  # iterations 3-4 did train
    logs = [[json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (single, tmp_path / "ddp")]
    assert [r["iter"] for r in logs[1]] == [1, 2, 2, 3, 4, 4]  # rank 0 alone logs (losses averaged over ranks) and evaluates
    assert np.allclose([r.get("loss", 0) for r in logs[0]], [r.get("loss", 0) for r in logs[1]], rtol=1e-5)
    assert [r.get("avg/top1") for r in logs[0]] == [r.get("avg/top1") for r in logs[1]]


def test_a_checkpoint_of_two_processes_resumes_with_two(tmp_path):
    with pytest.raises(ValueError, match="written by 2 training process"):
        own_rng({"rng": {}, "rng_ranks": [{}, {}]}, Dist())
    assert own_rng({"rng": "only"}, Dist()) == "only"
