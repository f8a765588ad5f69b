"""RUN folders with known contents, written without training: a config.json record, metrics.jsonl with chosen training
records and evaluations, per-class files where evaluation writes them, and weights saved at a chosen iteration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fcache.common.files import write_json
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.runfolder import CONFIG, RunDir
from fcache.train_heads.runrecord import TrainingRecord

TRAIN_STORE = "/data/train.zarr"


def make_run(
    path: Path,
    head: str,
    *,
    seed: int = 0,
    task: str = "detection",
    lr: float = 1e-3,
    params: int = 1_000_000,
    iters: int = 10,
    saved: int | None = None,
    logged: int | None = None,
    evals: dict[str, dict[str, float]] | None = None,
    per_class: dict[str, dict[str, Any]] | None = None,
    losses: list[float] | None = None,
    seconds: float = 5.0,
    peak_gb: float = 0.5,
    events: list[dict[str, Any]] | None = None,
    fingerprints: dict[str, str] | None = None,
) -> Path:
    """A RUN folder of ``head`` trained ``iters`` iterations (weights saved at ``saved``, default ``iters``; -1 for none).

    ``evals``: eval store path -> metrics, each logged at the last iteration with its ``eval/<name>`` folder, into
    which ``per_class`` (file name -> JSON, or text for .jsonl) is written; a store ``fingerprints`` (eval store path ->
    fingerprint) names gets its folder and ``store.json`` as evaluation makes them. ``losses``: one training record each,
    evenly spaced up to ``logged`` (default ``iters``), the last at ``seconds`` with ``peak_gb``.
    """
    cfg = with_defaults(TrainConfig(store=TRAIN_STORE, out=str(path), head=head, iters=iters, task=task, seed=seed, lr=lr, batch_size=2))
    record = TrainingRecord(cfg, "fingerprint-of-train", {"head": head}, (), params, 8)
    path.mkdir(parents=True)
    write_json(path / CONFIG, record.to_dict())
    run = RunDir(path)
    losses = [1.0] if losses is None else losses
    for k, loss in enumerate(losses, start=1):
        at = round((iters if logged is None else logged) * k / len(losses))
        run.log({"iter": at, "lr": lr, "loss": loss, "time_s": seconds * k / len(losses), "samples_per_s": 1.0, "peak_mem_gb": peak_gb})
    for store, metrics in (evals or {}).items():
        if store in (fingerprints or {}):  # named and recorded as evaluation does
            folder = run.eval_dir(store, (fingerprints or {})[store])
        else:
            folder = path / "eval" / Path(store).stem
            folder.mkdir(parents=True)
        for name, content in (per_class or {}).items():
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
        where = folder.relative_to(path).as_posix()
        run.log({"event": "eval", "iter": iters, "store": store, "samples": 4, "eval_dir": where, **metrics})
    for e in events or []:
        run.log(e)
    saved = iters if saved is None else saved
    if saved >= 0:
        save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"), metadata={"iteration": str(saved)})
    return path


def coco_metrics(ap: float, family: str = "box") -> dict[str, float]:
    """``box/AP`` = ap and the five others derived from it, distinct, so columns can be told apart."""
    return {
        f"{family}/{m}": round(ap + d, 6)
        for m, d in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), (0, 0.2, 0.1, -0.05, 0.01, 0.05), strict=True)
    }
