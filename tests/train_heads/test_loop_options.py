"""The training loop's options on the linear probe of a tiny labelled store: evaluation during training, the best
checkpoint, patience, TensorBoard and CSV logs, precision, gradient accumulation, EMA, epochs, kept checkpoints and
the warm-up warning; each checked by its effect on the RUN folder."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clshelpers import build_label_store
from safetensors import safe_open
from safetensors.torch import load_file

from fcache.cli import main
from fcache.common.errors import InputError
from fcache.train_heads import TrainConfig, run_train, training
from fcache.train_heads.checkpoints import BEST, CHECKPOINT, MODEL
from fcache.train_heads.console import format_train_summary
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.loggers import resolve_logger
from fcache.train_heads.metricslog import METRICS_CSV
from fcache.train_heads.optim import check_precision
from fcache.train_heads.validation import Validation, improves

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_label_store(tmp_path_factory.mktemp("labels") / "labels.zarr")


def config(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), out=str(out), task="classification", head="linear", iters=6, batch_size=4, lr=0.05, warmup=1)
    return TrainConfig(**{**base, "num_workers": 0, "device": "cpu", "log_every": 1, "logger": "none", **kw})


def records(run: Path, event: str | None = None) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == event]


def checkpoint(run: Path, iteration: int) -> dict:
    return torch.load(run / CHECKPOINT.format(iteration=iteration), weights_only=True)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol) for k in a)


def quiet(cfg: TrainConfig) -> dict:
    return run_train(cfg, progress=False, say=lambda m: None)


# -- evaluation during training -----------------------------------------------------------------------------------------
def test_the_best_direction():
    assert improves(0.5, None, higher=True) and improves(0.6, 0.5, higher=True) and not improves(0.5, 0.5, higher=True)
    assert improves(0.4, 0.5, higher=False) and not improves(0.6, 0.5, higher=False)
    assert not improves(float("nan"), None, higher=True) and not improves(None, 0.1, higher=True)
    v = Validation(lambda m, i, log: {}, every=2, metric="loss", higher=False, patience=2)
    assert [v.record({"loss": x}, it) for it, x in ((2, 3.0), (4, 1.0), (6, 2.0), (8, 1.5))] == [True, True, False, False]
    assert (v.best, v.best_iter, v.bad, v.exhausted) == (1.0, 4, 2, True)
    assert [v.due(k, 9) for k in range(1, 10)] == [False, True, False, True, False, True, False, True, True]


def test_eval_cadence_real_metrics(store, tmp_path):
    out = tmp_path / "run"
    summary = quiet(config(store, out, val_store=str(store), eval_every="2", iters=5))
    evals = records(out, "eval")
    assert [r["iter"] for r in evals] == [2, 4, 5]  # every 2 and when complete
    assert summary["eval"] == {k: v for k, v in evals[-1].items() if "/" in k}
    best = max(evals, key=lambda r: (r["avg/top1"], -r["iter"]))  # the first of the best
    assert summary["best"] == {"metric": "avg/top1", "value": best["avg/top1"], "iter": best["iter"]}
    with safe_open(str(out / BEST), framework="pt") as f:
        assert f.metadata()["iteration"] == str(best["iter"]) and f.metadata()["metric"] == "avg/top1"


SCRIPTED = [0.5, 0.8, 0.6, 0.7, 0.9, 0.9]  # avg/top1 of the evaluations at 2, 4, 6, ...


@pytest.fixture
def scripted(monkeypatch):
    """Evaluations that score SCRIPTED in turn (and log as the real ones do)."""
    calls: list[int] = []

    def fake(run, task, model, store, levels, batch_size, num_workers, device, iteration, progress, *, precision, log, read_ahead):
        metrics = {"avg/top1": SCRIPTED[len(calls)], "avg/top5": 1.0}
        calls.append(iteration)
        log({"event": "eval", "iter": iteration, "store": str(store.root), "samples": 12, "eval_dir": "eval/x"} | metrics)
        return metrics

    monkeypatch.setattr(training, "evaluate_into", fake)
    return calls


def test_best_checkpoint_holds_the_weights_of_the_best_evaluation(store, tmp_path, scripted):
    out = tmp_path / "run"
    summary = quiet(config(store, out, val_store=str(store), eval_every="2", iters=8, checkpoint_every=1, keep_last=8))
    assert scripted == [2, 4, 6, 8] and summary["best"] == {"metric": "avg/top1", "value": 0.8, "iter": 4}
    assert [r["avg/top1"] for r in records(out, "eval")] == SCRIPTED[:4]
    assert close(load_file(str(out / BEST)), checkpoint(out, 4)["model"])
    assert not close(load_file(str(out / BEST)), load_file(str(out / MODEL)))
    assert not summary["stopped_early"] and "stopped early" not in format_train_summary(summary)


def test_the_summary_names_best_weights_only_when_kept(store, tmp_path, scripted):
    kept = quiet(config(store, tmp_path / "kept", val_store=str(store), eval_every="2", iters=4))
    assert kept["best_weights"] == str(tmp_path / "kept" / BEST) and (tmp_path / "kept" / BEST).is_file()
    assert "at iteration 4 (best.safetensors)" in format_train_summary(kept)
    dropped = quiet(config(store, tmp_path / "dropped", val_store=str(store), eval_every="2", iters=4, keep_best=False))
    assert dropped["best"]["value"] is not None and dropped["best_weights"] is None and not (tmp_path / "dropped" / BEST).exists()
    text = format_train_summary(dropped)
    assert "best.safetensors" not in text and f"at iteration {dropped['best']['iter']} (weights not kept: --no-keep-best)" in text


def test_patience_stops_early_and_says_so(store, tmp_path, scripted):
    out = tmp_path / "run"
    cfg = config(store, out, val_store=str(store), eval_every="2", iters=20, patience=2)
    summary = quiet(cfg)
    assert scripted == [2, 4, 6, 8]  # best at 4, then two evaluations without improvement
    assert summary["iters"] == {"start": 0, "stop": 8, "total": 20} and summary["stopped_early"]
    assert "avg/top1 did not improve in 2 evaluations (best 0.8000 at iteration 4; --patience 2)" in summary["early_stop"]
    text = format_train_summary(summary)
    assert "stopped early at 8/20" in text and "best      avg/top1 80.0 at iteration 4" in text
    assert records(out, "early_stop") == [{"event": "early_stop", "iter": 8, "reason": summary["early_stop"]}]
    assert checkpoint(out, 8)["stopped"] == summary["early_stop"]
    again = quiet(config(store, out, val_store=str(store), eval_every="2", iters=20, patience=2, resume=True))
    assert again["iters"] == {"start": 8, "stop": 8, "total": 20} and again["stopped_early"] and scripted == [2, 4, 6, 8]


# -- logs --------------------------------------------------------------------------------------------------------------
def test_tensorboard_events_and_csv_equal_metrics_jsonl(store, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard logging needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert resolve_logger("auto") == "tensorboard"  # the default, where tensorboard is installed
    out = tmp_path / "run"
    flags = dict(val_store=str(store), eval_every="2", iters=6, log_every=2, logger="tensorboard", checkpoint_every=2, keep_last=3)
    quiet(config(store, out, stop_at=5, **flags))
    for k in (4, 5):  # as if killed after logging iteration 5 with only the checkpoint of iteration 2 kept
        (out / CHECKPOINT.format(iteration=k)).unlink()
    # TensorBoard reads event files in name order: the second in which a writer started, then the pid and a per-process
    # counter compared as text. Two sessions of one process in one second (only here: a real resume is a new process,
    # later) could be read in the wrong order, so the resumed session starts in a later second.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.05)
    quiet(config(store, out, resume=True, **flags))  # from 2: what 3..5 logged is dropped from every log, then logged again
    want: dict[str, list[tuple[int, float]]] = {}
    for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        prefix, skip = ("eval/", {"event", "iter", "store", "form", "samples", "eval_dir"}) if r.get("event") else ("train/", {"iter"})
        for k, v in r.items():
            if k not in skip:
                want.setdefault(prefix + k, []).append((r["iter"], v))
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/time_s", "eval/avg/top1"} <= set(want)
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(step, pytest.approx(v, rel=1e-6)) for step, v in points], tag
    assert "eval/confusion" in events.Tags()["images"]
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(out.glob("events.out.tfevents.*"))  # read raw, as any tool but TensorBoard's purging reader would
    steps = [[e.step for e in EventFileLoader(str(f)).Load() if e.HasField("summary")] for f in files]
    assert len(files) == 2 and max(steps[0]) == 2 and min(steps[1]) == 4  # what 3..5 logged is gone from the first file

    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = list(csv.DictReader((out / METRICS_CSV).open()))
    assert len(rows) == len(lines) and [int(r["iter"]) for r in rows] == [json.loads(x)["iter"] for x in lines]
    assert [int(r["iter"]) for r in rows if not r["event"]] == [2, 4, 6]  # every logged step
    assert [float(r["loss"]) for r in rows if not r["event"]] == [r["loss"] for r in records(out)]


# -- the step: precision, accumulation, EMA ----------------------------------------------------------------------------
def test_grad_accum_equals_the_larger_batch(store, tmp_path):
    accum = quiet(config(store, tmp_path / "accum", batch_size=2, grad_accum=3, iters=5))
    whole = quiet(config(store, tmp_path / "whole", batch_size=6, iters=5))
    assert accum["iters"] == whole["iters"]
    quiet(config(store, tmp_path / "small", batch_size=2, iters=5))
    a, b, small = (load_file(str(tmp_path / name / MODEL)) for name in ("accum", "whole", "small"))
    assert close(a, b, atol=1e-5) and not close(a, small, atol=1e-3)
    assert [r["loss"] for r in records(tmp_path / "accum")] == pytest.approx([r["loss"] for r in records(tmp_path / "whole")], rel=1e-5)


def test_ema_is_the_moving_average_of_the_weights(store, tmp_path):
    decay, n = 0.6, 4
    out = tmp_path / "run"
    quiet(config(store, out, ema=decay, iters=n, checkpoint_every=1, keep_last=n))
    raw = [checkpoint(out, k)["model"] for k in range(1, n + 1)]
    ema = dict(raw[0])  # the weights after the first step, then decay * ema + (1 - decay) * weights after each
    for w in raw[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
    saved = load_file(str(out / MODEL))
    assert close(saved, ema, atol=1e-6) and not close(saved, raw[-1], atol=1e-4)
    assert checkpoint(out, n)["ema"]["n_averaged"] == n


def test_fp16_trains_with_a_grad_scaler_and_resumes_exactly(store, tmp_path):
    try:
        check_precision(torch.device("cpu"), "fp16")
    except InputError as e:
        pytest.skip(f"this torch has no float16 autocast on the CPU: {e}")
    quiet(config(store, tmp_path / "straight", precision="fp16"))
    quiet(config(store, tmp_path / "split", precision="fp16", stop_at=3))
    quiet(config(store, tmp_path / "split", precision="fp16", resume=True))
    last = checkpoint(tmp_path / "split", 6)
    assert last["scaler"]["scale"] > 0 and "scaler" in checkpoint(tmp_path / "straight", 6)
    assert close(last["model"], checkpoint(tmp_path / "straight", 6)["model"])
    fp32 = quiet(config(store, tmp_path / "fp32"))
    assert fp32["final_loss"] == pytest.approx(records(tmp_path / "straight")[-1]["loss"], rel=0.05)
    assert not close(load_file(str(tmp_path / "fp32" / MODEL)), load_file(str(tmp_path / "straight" / MODEL)))


# -- lengths, checkpoints, warnings ------------------------------------------------------------------------------------
def test_epochs_resolve_to_iterations(store, tmp_path):
    cfg = config(store, tmp_path, iters=None, epochs=2.5)
    assert cfg.resolved(12).iters == 8  # ceil(2.5 x 12 / 4)
    assert TrainConfig(**{**cfg.to_dict(), "grad_accum": 3}).resolved(12).iters == 3  # 12 samples per iteration
    assert cfg.resolved(12).eval_interval(12) is None and config(store, tmp_path, val_store="v", eval_every="0.5e").eval_interval(12) == 2
    r = CliRunner().invoke(main, ["train-head", "--store", str(store), "--out", str(tmp_path / "run"), "--task", "classification",
                                  "--head", "linear", "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
                                  "--logger", "none", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["iters"]["total"] == 3
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert (recorded["epochs"], recorded["iters"], recorded["warmup"]) == (1.0, 3, 3)  # the task's 1 warm-up epoch
    with pytest.raises(ValueError, match="give --iters N or --epochs E"):
        config(store, tmp_path, iters=None)


def test_keep_last_leaves_exactly_k_checkpoints(store, tmp_path):
    quiet(config(store, tmp_path / "run", iters=5, checkpoint_every=1, keep_last=2))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*")) == ["checkpoint-4.pt", "checkpoint-5.pt"]


def test_warmup_longer_than_the_run_is_warned_about(store, tmp_path):
    said: list[str] = []
    run_train(config(store, tmp_path / "long", warmup=10, iters=3), progress=False, say=said.append)
    warnings = [m for m in said if m.startswith("warning:")]
    assert warnings == ["warning: the warm-up (10 iterations) is longer than the run (3): the learning rate never reaches --lr 0.05 "
                        "(the warm-up ends at 20% of it); give --warmup below 3, or train longer"]  # fmt: skip
    said.clear()
    run_train(config(store, tmp_path / "fits", warmup=3, iters=3), progress=False, say=said.append)
    assert said and not [m for m in said if m.startswith("warning:")]


def test_python_configs_take_the_same_per_task_defaults_as_the_command(store, tmp_path):
    """``with_defaults`` (applied by ``run_train``) fills what a ``TrainConfig(task=...)`` leaves unset from the task's and
    head's defaults, as the command does; a config alone holds only what it was given."""
    for task, head in (("segmentation", "upernet"), ("segmentation", "mask2former"), ("video", "linear"), ("classification", "linear"),
                       ("detection", "fpn")):  # fmt: skip
        flags = {name: None for name in ("batch_size", "lr", "weight_decay", "warmup", "warmup_factor", "warmup_epochs", "schedule",
                                         "lr_steps")}  # fmt: skip
        cli = with_defaults(TrainConfig.from_flags(store="s", out="o", task=task, head=head, iters=100, **flags))
        assert with_defaults(TrainConfig(store="s", out="o", task=task, head=head, iters=100)) == cli, (task, head)
        assert with_defaults(cli) == cli and cli.lr is not None and cli.schedule is not None
    bare = TrainConfig(store="s", out="o", task="segmentation", head="upernet", iters=1)
    assert bare.lr is None and with_defaults(bare).lr == 2e-3


def test_heads_in_one_pass_keep_their_own_best(store, tmp_path):
    from fcache.train_heads.training import folder_name, run_train_heads

    heads = ("linear", "linear:level=p4")
    cfgs = [config(store, tmp_path / "pass", head=h, val_store=str(store), eval_every="2", iters=6) for h in heads]
    summaries = run_train_heads(cfgs, progress=False, say=lambda m: None)
    for head, summary in zip(heads, summaries, strict=True):
        run = Path(summary["run"])
        alone = quiet(config(store, tmp_path / folder_name(head), head=head, val_store=str(store), eval_every="2", iters=6))
        assert summary["best"] == alone["best"] and summary["best"]["iter"] in (2, 4, 6)
        assert close(load_file(str(run / BEST)), load_file(str(Path(alone["run"]) / BEST)))
        evals = records(run, "eval")
        best = max(evals, key=lambda r: (r["avg/top1"], -r["iter"]))
        assert summary["best"]["iter"] == best["iter"]
    assert summaries[0]["run"] != summaries[1]["run"]


def test_the_progress_bar_shows_the_last_evaluation():
    from types import SimpleNamespace

    from fcache.train_heads.loop import progress_values
    from fcache.train_heads.schedule import get_lr

    v = Validation(lambda m, i, log: {}, every=2, metric="ss/mIoU")
    v.record({"ss/mIoU": 0.4321, "ss/mAcc": 0.5}, 2)
    cfg = with_defaults(TrainConfig(store="s", out="o", task="segmentation", head="upernet", iters=10, warmup=0))
    meter = SimpleNamespace(last={"loss": 1.5}, rate=12.0)
    # linear decay (segmentation default), no warm-up: 2e-3 x (1 - 3/10)
    assert progress_values(meter, v, get_lr(3, cfg)) == {"loss": "1.5000", "samples_s": "12.0", "lr": "1.40e-03", "ss/mIoU": "0.4321"}


def test_wandb_gets_every_record_at_its_iteration_and_resumes_the_same_run(store, tmp_path, monkeypatch):
    """The --logger wandb path against a stand-in module that records the calls (wandb itself is optional here)."""
    import importlib.machinery
    import sys
    import types

    calls: list[tuple] = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    fake.Image = lambda picture: ("image", np.asarray(picture).shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    flags = dict(logger="wandb", val_store=str(store), eval_every="3", iters=6, log_every=2)
    quiet(config(store, out, stop_at=4, **flags))
    first = [c[1] for c in calls if c[0] == "init"]
    quiet(config(store, out, resume=True, **flags))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == first[0]["id"]  # the same W&B run continues
    assert inits[0]["dir"] == str(out) and inits[0]["resume"] == "allow" and inits[0]["name"] == "run"
    logged = [(c[1], k) for c in calls if c[0] == "log" for k in c[2]]
    train = sorted({step for step, k in logged if k == "train/loss"})
    assert train == [2, 4, 6] and {step for step, k in logged if k.startswith("eval/") and "top1" in k} == {3, 6}
    for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if not r.get("event"):
            (step_values,) = [c[2] for c in calls if c[0] == "log" and c[1] == r["iter"] and "train/loss" in c[2]]
            assert step_values["train/loss"] == r["loss"]
    assert calls[-1] == ("finish",)
