"""Every numeric flag is checked before anything is created: one line naming the flag and the fix, exit code 2.

One row per (command, flag, value, expected fragment); a new flag joins the table. Each row also checks that the
refused command left nothing behind (no store, no RUN folder).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from fcache.cli import main
from helpers import refused
from media import image_folder

EXTRACT = ["extract", "--dataset", "folder", "--random-init", "--device", "cpu"]
PLAN = ["plan", "--dataset", "folder", "--random-init", "--device", "cpu", "--no-run"]
TRAIN = ["train-head", "--head", "fpn", "--iters", "2", "--device", "cpu"]
VERIFY, COPY, EXPORT_WDS, PREDICT, EXPORT, RUNS, DEMO = ["verify"], ["copy"], ["export-wds"], ["predict"], ["export"], ["runs"], ["demo"]

ROWS = [
    # extract: source and store settings
    (EXTRACT, "--writers", "-1", "--writers -1: must be at least 0"),
    (EXTRACT, "--view-scale", "0.5,1e308", "--view-scale 0.5,1e+308: must be at most 16"),
    (EXTRACT, "--view-scale", "2,1", "need LO <= HI"),
    (EXTRACT, "--seed", "-1", "--seed -1: must be at least 0"),
    (EXTRACT, "--limit", "-1", "--limit -1: must be at least 0"),
    (EXTRACT, "--decode-timeout", "-1", "--decode-timeout -1.0: must be greater than 0"),
    (EXTRACT, "--decode-timeout", "nan", "--decode-timeout nan: must be a finite number"),
    (EXTRACT, "--num-workers", "-1", "--num-workers -1: must be at least 0"),
    (EXTRACT, "--batch-size", "0", "--batch-size 0: must be at least 1"),
    (EXTRACT, "--shard-size", "0", "--shard-size 0: must be at least 1"),
    (EXTRACT, "--views", "0", "--views 0: must be at least 1"),
    (EXTRACT, "--frames", "0", "--frames 0: must be at least 1"),
    (EXTRACT, "--max-pixels", "0", "--max-pixels 0: must be at least 1"),
    (EXTRACT, "--input-size", "100", "not a multiple of 32"),
    (EXTRACT, "--levels", ",", "no level given"),
    (EXTRACT, "--levels", "p3,p3", "gives a level twice"),
    (EXTRACT, "--levels", "p9", "unknown level 'p9'"),
    (EXTRACT, "--device", "banana", "--device 'banana' is not a device"),
    (EXTRACT, "--dtype", "fp7", "unknown dtype 'fp7'"),
    (EXTRACT, "--codec", "zstd:42", "zstd level must be 1..9"),
    (EXTRACT, "--test-views", "upside-down", "unknown test view(s) upside-down"),
    (EXTRACT, "--cluster", "local:0", "--cluster local:0: needs at least one worker"),
    # plan: the estimate's own settings
    (PLAN, "--assume-tflops", "0", "--assume-tflops 0.0: must be greater than 0"),
    (PLAN, "--assume-tflops", "-5", "--assume-tflops -5.0: must be greater than 0"),
    (PLAN, "--assume-tflops", "nan", "--assume-tflops nan: must be a finite number"),
    (PLAN, "--measure", "-1", "--measure -1: must be at least 0"),
    # train-head: the schedule and the loader
    (TRAIN, "--gamma", "nan", "--gamma nan: must be a finite number"),
    (TRAIN, "--gamma", "-3", "--gamma -3.0: must be greater than 0"),
    (TRAIN, "--lr", "0", "--lr 0.0: must be greater than 0"),
    (TRAIN, "--lr", "inf", "--lr inf: must be a finite number"),
    (TRAIN, "--warmup-epochs", "inf", "--warmup-epochs inf: must be a finite number"),
    (TRAIN, "--warmup", "-1", "--warmup -1: must be at least 0"),
    (TRAIN, "--train-fraction", "1.5", "--train-fraction 1.5: must be at most 1"),
    (TRAIN, "--lr-steps", "0.5,2", "--lr-steps 0.5,2.0: must be at most 1"),
    (TRAIN, "--epochs", "0", "--epochs 0.0: must be greater than 0"),
    (TRAIN, "--epochs", "nan", "--epochs nan: must be a finite number"),
    (TRAIN, "--epochs", "2", "give --iters or --epochs, not both"),
    (TRAIN, "--grad-accum", "0", "--grad-accum 0: must be at least 1"),
    (TRAIN, "--ema", "1", "--ema 1.0: must be less than 1"),
    (TRAIN, "--ema", "0", "--ema 0.0: must be greater than 0"),
    (TRAIN, "--keep-last", "0", "--keep-last 0: must be at least 1"),
    (TRAIN, "--patience", "0", "--patience 0: must be at least 1"),
    (TRAIN, "--patience", "2", "--patience 2 counts evaluations: give --eval-every"),
    (TRAIN, "--eval-every", "0", "--eval-every 0: must be greater than 0"),
    (TRAIN, "--eval-every", "-1e", "--eval-every -1e: must be greater than 0"),
    (TRAIN, "--eval-every", "often", "--eval-every often: use N (iterations) or Ne (epochs)"),
    (TRAIN, "--eval-every", "nane", "--eval-every nane: use N (iterations) or Ne (epochs)"),
    (TRAIN, "--eval-every", "infe", "--eval-every infe: use N (iterations) or Ne (epochs)"),
    (TRAIN, "--eval-every", "1e400e", "--eval-every 1e400e: use N (iterations) or Ne (epochs)"),
    (TRAIN, "--eval-every", "10", "--eval-every 10 evaluates on --val-store: give one"),
    (TRAIN, "--precision", "fp8", "unknown precision 'fp8'"),
    (TRAIN, "--logger", "mlflow", "unknown logger 'mlflow'"),
    (TRAIN, "--seed", "-1", "--seed -1: must be at least 0"),
    (TRAIN, "--num-workers", "-1", "--num-workers -1: must be at least 0"),
    (TRAIN, "--iters", "0", "--iters 0: must be at least 1"),
    (TRAIN, "--clip", "0", "--clip 0.0: must be greater than 0"),
    (TRAIN, "--batch-size", "0", "--batch-size 0: must be at least 1"),
    (TRAIN, "--device", "banana", "--device 'banana' is not a device"),
    (TRAIN, "--head", "fpn:channels=100000", "channels=100000 must be at most 4096"),
    (TRAIN, "--head", "bifpn:layers=1000", "layers=1000 must be at most 32"),
    (TRAIN, "--task", "captioning", "unknown task 'captioning'"),
    # the store commands
    (VERIFY, "--sample", "0", "--sample 0.0: must be greater than 0"),
    (VERIFY, "--sample", "1.5", "--sample 1.5: must be at most 1"),
    (VERIFY, "--recompute", "-1", "--recompute -1: must be at least 0"),
    (VERIFY, "--tolerance", "0", "--tolerance 0.0: must be greater than 0"),
    (VERIFY, "--storage-options", "[1]", "--storage-options"),
    (COPY, "--workers", "0", "--workers 0: must be at least 1"),
    (EXPORT_WDS, "--shard-size", "lots", "'lots' is not a size"),
    # predict, export, runs, demo
    (PREDICT, "--batch-size", "0", "--batch-size 0: must be at least 1"),
    (PREDICT, "--score-thr", "1.5", "--score-thr 1.5: must be at most 1"),
    (PREDICT, "--score-thr", "nan", "--score-thr nan: must be a finite number"),
    (PREDICT, "--top-k", "0", "--top-k 0: must be at least 1"),
    (PREDICT, "--clips", "0", "--clips 0: must be at least 1"),
    (PREDICT, "--weights", "missing.safetensors", "File 'missing.safetensors' does not exist"),
    (PREDICT, "--on-error", "ignore", "--on-error"),
    (PREDICT, "--storage-options", "[1]", "--storage-options"),
    (PREDICT, "--cache-size", "lots", "'lots' is not a size"),
    (EXPORT, "--batch-size", "0", "--batch-size 0: must be at least 1"),
    (EXPORT, "--format", "tflite", "unknown format 'tflite'"),
    (RUNS, "--stale-after", "-1", "--stale-after -1.0: must be at least 0"),
    (RUNS, "--stale-after", "nan", "--stale-after nan: must be a finite number"),
    (RUNS, "--stale-after", "inf", "--stale-after inf: must be a finite number"),
    (DEMO, "--iters", "0", "--iters 0: must be at least 1"),
    (DEMO, "--train-images", "0", "--train-images 0: must be at least 1"),
    (DEMO, "--val-images", "-2", "--val-images -2: must be at least 1"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("flags") / "images", n=2)


@pytest.mark.parametrize(("command", "flag", "value", "fragment"), ROWS, ids=[f"{r[0][0]}{r[1]}={r[2]}" for r in ROWS])
def test_bad_value_is_one_line_and_nothing_is_created(command, flag, value, fragment, folder, tmp_path):
    out = tmp_path / "out"
    if command is EXTRACT:
        args = [*command, "--root", str(folder), "--out", str(out)]
    elif command is PLAN:
        args = [*command, "--root", str(folder)]
    elif command is TRAIN:
        args = [*command, "--store", str(folder), "--out", str(out)]
    else:  # a folder stands for the store or RUN the command reads: the flag is refused before it is opened
        places = {"copy": [str(folder), str(out)], "predict": [str(folder), str(folder)], "runs": [str(folder)], "demo": []}
        args = [*command, *places.get(command[0], [str(folder)])] + (
            [] if command[0] in ("copy", "runs", "verify") else ["--out", str(out)]
        )
    if flag == "--head":  # the table's own --head replaces TRAIN's
        args = [a for a in args if a != "fpn" and a != "--head"]
    r = CliRunner().invoke(main, [*args, flag, value])
    refused(r, fragment)
    assert not out.exists()


def test_wandb_without_wandb_is_refused_before_anything_is_created(folder, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    r = CliRunner().invoke(main, [*TRAIN, "--store", str(folder), "--out", str(tmp_path / "run"), "--logger", "wandb"])
    refused(r, "--logger wandb: wandb is not installed here; pip install wandb, or use --logger none")
    assert not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_refused_before_anything_is_created(folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    measuring_plan = [a for a in PLAN if a != "--no-run"]  # plan --no-run measures nothing: it may plan for another machine
    for args in ([*EXTRACT, "--root", str(folder), "--out", str(tmp_path / "s")], [*measuring_plan, "--root", str(folder)]):
        args = [a if a != "cpu" else "cuda" for a in args]
        refused(CliRunner().invoke(main, args), "--device cuda: no CUDA device is available here")
    assert not (tmp_path / "s").exists()


def test_the_corrected_command_runs_after_a_refusal(folder, tmp_path):
    """A refusal leaves no store that would make the corrected command fail as 'another configuration'."""
    args = [*EXTRACT, "--root", str(folder), "--out", str(tmp_path / "s"), "--input-size", "64", "--levels", "p5", "--num-workers", "0"]
    refused(CliRunner().invoke(main, [*args, "--seed", "-1"]), "--seed -1: must be at least 0")
    r = CliRunner().invoke(main, [*args, "--seed", "0", "--json"])
    assert r.exit_code == 0, r.output
