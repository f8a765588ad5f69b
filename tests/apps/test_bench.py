"""`fcache bench`: the three settings of the paper's Tables 7 and 8 for each task, each measured in its own process.

Timings are the benchmarks' business (make bench); here the table's structure and its parameter counts.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

from fcache.apps.bench import PAPER, BenchConfig
from fcache.cli import main

SWINV2_T_PARAMS = 27_576_618  # what computes SwinV2-T's 4 levels (no classifier, no final norm): trained in `finetune`
CPU = ["--device", "cpu", "--num-workers", "0", "--iters", "1", "--json"]
KEYS = {"setting", "task", "model", "input_size", "batch", "head", "s_per_iter", "s_per_iter_min", "peak_mem_gb", "trainable_params",
        "head_params", "backbone_params"}  # fmt: skip


def bench(*args: str) -> list[dict]:
    r = CliRunner().invoke(main, ["bench", *args, *CPU])
    rows = json.loads(r.output)
    assert r.exit_code == (1 if any("error" in row for row in rows) else 0), r.output
    return rows


def check_rows(rows: list[dict], task: str, size: int, batch: int, head: str, finetune_head: str) -> dict[str, dict]:
    by = {row["setting"]: row for row in rows}
    assert list(by) == ["store", "online", "finetune"]
    for row in rows:
        assert "error" not in row, row
        assert set(row) >= KEYS and (row["task"], row["model"], row["input_size"], row["batch"]) == (task, "swinv2-t", size, batch)
        assert row["s_per_iter"] >= row["s_per_iter_min"] > 0 and row["peak_mem_gb"] > 0.1
        assert row["trainable_params"] == row["head_params"] + row["backbone_params"]
    assert by["store"]["head"] == by["online"]["head"] == head and by["finetune"]["head"] == finetune_head
    assert by["store"]["trainable_params"] == by["online"]["trainable_params"] == by["store"]["head_params"] > 0
    assert by["store"]["backbone_params"] == by["online"]["backbone_params"] == 0
    assert by["finetune"]["backbone_params"] == SWINV2_T_PARAMS  # the frozen head is not the finetuned one
    return by


@pytest.mark.slow
def test_detection_rows():
    head, ft = "bifpn:layers=2,channels=64,rois=16,rpn_batch=32", "fpn:channels=64,rois=16,rpn_batch=32"
    rows = bench("--input-size", "128", "--batch-size", "2", "--head", head, "--finetune-head", ft)
    check_rows(rows, "detection", 128, 2, head, ft)


@pytest.mark.slow
def test_segmentation_rows():
    head, ft = "mask2former:pixel_blocks=2,channels=32,queries=8", "mask2former:channels=32,queries=8"
    rows = bench("--task", "segmentation", "--input-size", "128", "--batch-size", "1", "--head", head, "--finetune-head", ft)
    by = check_rows(rows, "segmentation", 128, 1, head, ft)
    assert by["store"]["head_params"] > by["finetune"]["head_params"]  # 2 pixel decoder blocks against 1


@pytest.mark.slow
def test_video_rows():
    head = "temporal:blocks=1,dim=64"
    rows = bench("--task", "video", "--input-size", "64", "--batch-size", "2", "--frames", "2", "--head", head)
    by = check_rows(rows, "video", 64, 2, head, "linear")  # Table 7's full-finetune head for Kinetics-400
    assert all(row["frames"] == 2 for row in rows)
    assert by["finetune"]["head_params"] == 768 * 400 + 400  # linear over SwinV2-T's p5, 400 classes


def test_features_only_measures_the_store_row_without_weights():
    (row,) = bench("--model", "swinv2-g", "--input-size", "64", "--batch-size", "1", "--head", "fpn:channels=32,rois=8,rpn_batch=16",
                   "--features-only")  # fmt: skip
    assert row["setting"] == "store" and row["s_per_iter"] > 0 and row["model"] == "swinv2-g" and row["backbone_params"] == 0


def test_a_head_that_cannot_be_built_is_an_error_row():
    (row,) = bench(
        "--task", "segmentation", "--input-size", "64", "--batch-size", "1", "--head", "upernet:channels=96,aux=1", "--features-only"
    )
    assert row["setting"] == "store" and row["head"] == "upernet:channels=96,aux=1" and "s_per_iter" not in row
    assert "InputError" in row["error"] and "needs channels divisible by 64" in row["error"]


def test_a_mistyped_head_is_one_line():
    r = CliRunner().invoke(main, ["bench", "--task", "video", "--head", "global:block=4", *CPU])
    assert r.exit_code == 2 and "unknown key 'block'" in r.output and "Traceback" not in r.output


def test_defaults_are_the_papers():
    """Tables 7 and 8: heads per task, batch sizes per backbone, and the inputs of Tables 11-13."""
    want = {
        ("detection", "swinv2-b"): (1024, 16, 0, "bifpn:layers=5", "fpn"),
        ("detection", "swinv2-g"): (1024, 8, 0, "bifpn:layers=5", "fpn"),
        ("segmentation", "swinv2-l"): (512, 16, 0, "mask2former:pixel_blocks=6", "mask2former:pixel_blocks=1"),
        ("segmentation", "swinv2-g"): (640, 8, 0, "mask2former:pixel_blocks=6", "mask2former:pixel_blocks=1"),
        ("video", "swinv2-t"): (224, 64, 16, "global:blocks=4", "linear"),
        ("video", "swinv2-l"): (224, 32, 16, "global:blocks=4", "linear"),
        ("video", "swinv2-g"): (224, 16, 16, "global:blocks=4", "linear"),
    }
    for (task, model), values in want.items():
        c = BenchConfig(task=task, model=model, device="cpu")
        assert (c.input_size, c.batch_size, c.frames, c.head, c.finetune_head) == values, (task, model)
    assert set(PAPER) == {"detection", "segmentation", "video"}
    with pytest.raises(ValueError, match="--iters 0: must be at least 1"):
        BenchConfig(iters=0, device="cpu")


def test_a_measuring_process_that_dies_is_an_error_row(tmp_path, monkeypatch):
    """A setting whose process is killed (as the out-of-memory killer does) is a row saying so; the table still prints."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\nimport fcache.apps.bench_measure as m\nm.measure = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
    )  # runs at start-up of the spawned measuring process only (the test process has started already)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *sys.path]))
    args = ["bench", "--input-size", "64", "--batch-size", "1", "--head", "fpn:channels=32,rois=8,rpn_batch=16", "--features-only"]
    (row,) = bench(*args[1:])
    assert row["setting"] == "store" and row["error"] == "the measuring process died (exit code -9; out of memory?)"
    r = CliRunner().invoke(main, [*args, *CPU[:-1]])  # the table, not --json
    assert r.exit_code == 1 and "the measuring process died" in r.output and "Traceback" not in r.output
