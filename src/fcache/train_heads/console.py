"""Human-readable summaries of ``fcache train-head`` and ``fcache eval`` (the JSON forms are the dicts themselves)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def format_metrics(metrics: Mapping[str, float], task: str) -> list[str]:
    """One line per metric family (``box/AP`` ... -> ``box   AP 45.0  AP50 ...``), in percent or as they are (the task's
    ``TaskDef.percent``); '-' where undefined (-1)."""
    families: dict[str, list[str]] = {}
    for key, value in metrics.items():
        family, _, name = key.partition("/")
        families.setdefault(family, []).append(f"{name} {shown(value, task)}")
    return [f"{family:<5} " + "  ".join(parts) for family, parts in families.items()]


def shown(value: float, task: str) -> str:
    from fcache.train_heads.tasks import task_def

    scale, digits = task_def(task).number_format
    return "-" if value < 0 else f"{scale * value:.{digits}f}"


def format_train_summary(s: Mapping[str, Any]) -> str:
    it = s["iters"]
    if s.get("stopped_early"):
        status = f"stopped early at {it['stop']}/{it['total']}: {s['early_stop']}"
    else:
        status = "finished" if it["stop"] == it["total"] else f"stopped at {it['stop']}/{it['total']} (resume with --resume)"
    lines = [
        f"run       {s['run']}  ({status})",
        f"head      {s['task']} {s['head']}  ({s['trainable_params']:,} trainable parameters)",
        f"trained   iterations {it['start']}..{it['stop']} on {s['train_samples']} samples in {s['seconds']:.1f} s "
        f"({s['samples_per_s']:.2f} samples/s)",
        "loss      " + ("-" if s["final_loss"] is None else f"{s['final_loss']:.4f} (mean of the last logging window)"),
    ]
    if "eval" in s:
        lines += ["eval      " + line for line in format_metrics(s["eval"], s["task"])]
    best = s.get("best")
    if best and best.get("value") is not None:
        kept = f"({Path(s['best_weights']).name})" if s.get("best_weights") else "(weights not kept: --no-keep-best)"
        lines.append(f"best      {best['metric']} {shown(best['value'], s['task'])} at iteration {best['iter']} {kept}")
    return "\n".join(lines)


def format_eval(s: Mapping[str, Any]) -> str:
    lines = [f"run       {s['run']} (iteration {s['iter']}) on {s['store']} (features: {s['form']}), {s['samples']} samples"]
    lines += ["          " + line for line in format_metrics(s["metrics"], s["task"])]
    return "\n".join(lines + ([f"files     {s['out']}"] if "out" in s else []))
