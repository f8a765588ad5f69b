"""``fcache runs [FOLDER...]``: the RUN folders under some folders, each with its status, progress and best metric.

A run's status, from its files (the process training into a folder holds its RUN lease, ``runlease.py``):

- ``finished``: its saved weights (``model.safetensors``) are those of its last iteration (``--iters``);
- ``early-stopped``: they are those of the iteration where ``--patience`` stopped it (no evaluation improved);
- ``running``: neither, and a live process holds its lease;
- ``diverged``: its loss stopped being finite (the loop logs ``{"event": "diverged"}`` into metrics.jsonl; resuming
  from the last checkpoint truncates the record away, so a resumed run is running again);
- ``stopped``: none of these, and the holder of its lease is gone (the run was killed): ``--resume`` continues it;
- without a lease (the run ended or was interrupted, or an earlier release trained it, which took none), ``running``
  when a file of the folder changed within ``stale_after`` seconds (default 10 minutes), or within three of the run's
  own longest gaps between two metrics records when those are longer (a slow run that logs rarely is not taken for a
  stopped one), else ``stopped`` (interrupted, killed, or ``--stop-at`` reached: ``--resume`` continues it);
- ``damaged``: its config.json or metrics.jsonl cannot be read (the line says why); the other runs are listed as usual.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from fcache.common.errors import FcacheError
from fcache.train_heads.analysis.leaderboard import higher_is_better
from fcache.train_heads.analysis.report import find_runs
from fcache.train_heads.analysis.results import last_iteration, main_metric
from fcache.train_heads.checkpoints import MODEL
from fcache.train_heads.config import RunsConfig
from fcache.train_heads.metricslog import METRICS
from fcache.train_heads.runfolder import CONFIG, RunDir
from fcache.train_heads.runlease import holder

STALE_AFTER_S = float(RunsConfig.stale_after)  # the --stale-after default
STATUSES = ("finished", "early-stopped", "running", "stopped", "diverged", "damaged")


def saved_iteration(run: RunDir) -> int:
    """The iteration of the run's saved weights (0 without any, or unreadable ones)."""
    p = run.path / MODEL
    if not p.is_file():
        return 0
    try:
        with safe_open(str(p), framework="pt") as f:
            return int((f.metadata() or {}).get("iteration", 0))
    except Exception:  # a file being replaced or cut: the run is not finished by it
        return 0


def last_change(run: RunDir) -> float:
    """When the run's folder last changed: the newest modification time of its files (seconds since the epoch)."""
    files = [run.path / name for name in (CONFIG, METRICS, MODEL)] + [p for _, p in run.checkpoints()]
    times = []
    for f in files:
        try:
            times.append(f.stat().st_mtime)
        except FileNotFoundError:  # absent, or a checkpoint --keep-last removed meanwhile
            continue
    return max(times, default=0.0)


def recent_window(records: Sequence[dict[str, Any]], stale_after: float) -> float:
    """Seconds without a change after which an unfinished run counts as stopped (see the module docstring)."""
    times = [float(r["time_s"]) for r in records if r.get("event") is None and "time_s" in r]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= a]  # a resumed session restarts time_s
    return max(stale_after, 3 * max(gaps, default=0.0))


def run_status(path: str | Path, *, now: float | None = None, stale_after: float = STALE_AFTER_S) -> dict[str, Any]:
    """One line of ``fcache runs``: path, task, head, status, iterations done / total, and the best evaluation."""
    run = RunDir(path)
    try:
        record = run.require_config()
        cfg, records = record.config, run.metrics()
    except FcacheError as e:
        return damaged(run, str(e))
    saved = saved_iteration(run)
    changed = last_change(run)
    age = (time.time() if now is None else now) - changed
    lease = holder(run.path)
    if saved == cfg.iters:
        status = "finished"
    elif any(r.get("event") == "early_stop" and r.get("iter") == saved for r in records):  # --patience
        status = "early-stopped"
    elif lease is not None and lease[1]:
        status = "running"
    elif any(r.get("event") == "diverged" for r in records):
        status = "diverged"
    elif lease is not None:  # its holder is gone
        status = "stopped"
    else:
        status = "running" if age <= recent_window(records, stale_after) else "stopped"
    metric = main_metric(cfg.task)
    evals = [r for r in records if r.get("event") == "eval" and isinstance(r.get(metric), int | float) and r[metric] >= 0]
    best = (max if higher_is_better(cfg.task) else min)(evals, key=lambda r: r[metric], default=None)
    return {
        "run": str(run.path),
        "task": cfg.task,
        "head": record.head,
        "status": status,
        "iters_done": max(saved, last_iteration(records)),
        "iters": cfg.iters,
        "saved_iter": saved,
        "eval_store": best.get("store") if best else None,
        "metric": metric,
        "best": best[metric] if best else None,
        "best_iter": best.get("iter") if best else None,
        "seconds_since_change": round(age, 1),
        "process": {k: lease[0].get(k) for k in ("command", "pid", "host")} if lease is not None and status == "running" else None,
        "error": next((r.get("error") for r in reversed(records) if r.get("event") == "diverged"), None) if status == "diverged" else None,
    }


def damaged(run: RunDir, error: str) -> dict[str, Any]:
    """The line of a RUN folder whose records cannot be read: its path, status ``damaged`` and why."""
    keys = ("task", "head", "iters_done", "iters", "saved_iter", "eval_store", "metric", "best", "best_iter", "seconds_since_change",
            "process")  # fmt: skip
    return {"run": str(run.path), **dict.fromkeys(keys), "status": "damaged", "error": error}


def list_runs(paths: Iterable[str | Path], *, stale_after: float = STALE_AFTER_S) -> list[dict[str, Any]]:
    """:func:`run_status` of every RUN folder under ``paths`` (as ``fcache report`` finds them), sorted by path."""
    now = time.time()
    return sorted((run_status(p, now=now, stale_after=stale_after) for p in find_runs(paths)), key=lambda r: r["run"])


def _shown_path(path: str) -> str:
    """A run's path relative to the current folder when it lies below it (as typed, mostly), else as is."""
    p = Path(path)
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else path


def format_runs(lines: Sequence[dict[str, Any]]) -> str:
    """The table ``fcache runs`` prints: run (relative to the current folder when below it), task, head, status,
    iterations, eval store and best main metric (percent, or as it is: ``TaskDef.percent``)."""
    from fcache.train_heads.analysis.leaderboard import markdown_table, number_format

    cells = [["run", "task", "head", "status", "iters", "eval store", "best"]]
    for r in lines:
        if r["status"] == "damaged":
            cells.append([_shown_path(r["run"]), "-", "-", "damaged", "-", "-", "-"])
            continue
        scale, digits = number_format(r["task"])
        best = "-" if r["best"] is None else f"{r['metric']} {scale * r['best']:.{digits}f}"
        store = Path(r["eval_store"]).name if r["eval_store"] else "-"
        cells.append([_shown_path(r["run"]), r["task"], r["head"], r["status"], f"{r['iters_done']}/{r['iters']}", store, best])
    counts = ", ".join(f"{sum(r['status'] == s for r in lines)} {s}" for s in STATUSES if any(r["status"] == s for r in lines))
    why = [f"{_shown_path(r['run'])}: {r['error']}" for r in lines if r["status"] == "damaged"]
    return markdown_table(cells) + f"\n{len(lines)} run(s): {counts}" + "".join(f"\ndamaged: {w}" for w in why)
