"""The figures of ``fcache report`` and ``fcache sweep``, each written as PNG and PDF (``results.save_figure``).

- the main metric against trainable parameters (the paper's Figures 1 and 4): one point per leaderboard entry (mean
  over seeds, the standard deviation as an error bar), one series per head family, split further by training store,
  evaluation store and train fraction where the runs hold several. A family whose entries share a parameter count
  (heads that differ only in a key that adds no parameter, e.g. ``rois``, or in lr) is drawn as one series per entry,
  so every entry stays a point of its own.
- the training loss against iteration, one line per run. Every series has markers where it has a single point, so a
  run logged once (a short sweep) is drawn, not an empty axes with a legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fcache.train_heads.analysis.leaderboard import Entry, number_format
from fcache.train_heads.analysis.results import main_metric, save_figure, task_panels
from fcache.train_heads.runfolder import RunDir


def metric_series(mine: Sequence[Entry]) -> dict[str, list[tuple[int, float, float]]]:
    """Series of one task's entries: label -> [(trainable parameters, mean main metric, its std or 0)] by parameters."""
    if not mine:
        return {}
    metric = main_metric(mine[0].task)
    scored = [e for e in mine if e.mean(metric) is not None]
    many = lambda key: len({str(e.setup.get(key)) for e in scored}) > 1  # noqa: E731
    many_evals = len({e.eval_name for e in scored}) > 1
    grouped: dict[str, list[Entry]] = {}
    for e in scored:
        label = e.family + (f" @ {e.setup['store']}" if many("store") else "")
        label += f" on {e.eval_name}" if many_evals else ""
        label += f", {100 * e.setup['train_fraction']:g}% data" if many("train_fraction") else ""
        grouped.setdefault(label, []).append(e)
    out: dict[str, list[tuple[int, float, float]]] = {}
    for label, members in sorted(grouped.items()):
        params = [e.trainable_params for e in members]
        split = len(set(params)) < len(params)  # two entries at one x: each its own series
        for e in members:
            key = f"{label}: {e.label}" if split else label
            out.setdefault(key, []).append((e.trainable_params, e.mean(metric) or 0.0, e.std(metric) or 0.0))
    return {k: sorted(v) for k, v in out.items()}


def draw_metric(board: dict[str, list[Entry]]) -> Any:
    """Main metric (percent, or as it is: ``TaskDef.percent``) against trainable parameters (log scale), one panel per
    task; the figure."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [{"task": task} for task in board]
    fig, panels = task_panels(rows, 5.5)
    for ax, task, _ in panels:
        scale, _ = number_format(task)
        for label, points in metric_series(board.get(task, [])).items():
            x, y, err = ([p[0] / 1e6 for p in points], [scale * p[1] for p in points], [scale * p[2] for p in points])
            ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("trainable parameters (M)")
        ax.set_ylabel(main_metric(task) + (" (%)" if scale == 100.0 else ""))
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_metric(board: dict[str, list[Entry]], path: str | Path) -> Path:
    """:func:`draw_metric` written to ``path`` (PNG) and beside it as PDF."""
    return save_figure(draw_metric(board), path, legend_size=8)


def loss_curves(run: str | Path) -> list[tuple[int, float]]:
    """(iteration, total loss) of a run's training records, the last record kept where a resumed run logged twice."""
    points: dict[int, float] = {}
    for r in RunDir(run).metrics():
        if r.get("event") is None and "loss" in r and "iter" in r:
            points[int(r["iter"])] = float(r["loss"])
    return sorted(points.items())


def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A label per row: the head, plus the settings that differ between the rows (store, lr, train fraction, seed)."""
    varying = [k for k in ("store", "lr", "train_fraction", "seed") if len({str(r[k]) for r in rows}) > 1]
    shown = {"store": lambda v: Path(v).name, "lr": lambda v: f"lr {v:g}", "train_fraction": lambda v: f"{100 * v:g}% data"}
    out = []
    for r in rows:
        extra = [shown.get(k, lambda v, k=k: f"{k} {v}")(r[k]) for k in varying]
        out.append(", ".join([r["head"], *extra]))
    return out


def draw_losses(rows: Sequence[dict[str, Any]]) -> Any:
    """Training loss against iteration, one panel per task, one line per run (log scale when it spans a decade)."""
    fig, panels = task_panels(rows, 6.5)
    for ax, task, mine in panels:
        values: list[float] = []
        mine = list({r["run"]: r for r in mine}.values())  # a run evaluated on several stores: one curve
        for row, label in zip(mine, _labels(mine), strict=True):
            points = loss_curves(row["run"])
            if points:
                marker = "o" if len(points) == 1 else None  # a single logged point is no line: draw it as a marker
                ax.plot([i for i, _ in points], [v for _, v in points], label=label, lw=1.2, marker=marker)
                values += [v for _, v in points]
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 10:
            ax.set_yscale("log")
        ax.set(xlabel="iteration", ylabel="training loss", title=task)
        ax.grid(True, alpha=0.3)
    return fig


def plot_losses(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """:func:`draw_losses` written to ``path`` (PNG) and beside it as PDF."""
    return save_figure(draw_losses(rows), path, legend_size=7)
