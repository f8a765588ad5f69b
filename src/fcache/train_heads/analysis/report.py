"""``fcache report RUN... --out DIR``: an ablation at a glance from any RUN folders (train-head, a multi-head pass,
a sweep): the results table (CSV and Markdown), the metric against trainable parameters, the loss curves, and a
``report.md`` that shows them together.

Reads RUN folders only (``config.json``, ``metrics.jsonl``), so it works on runs trained anywhere, any time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fcache.common.errors import InputError
from fcache.train_heads.analysis.results import CSV_NAME, MARKDOWN_NAME, PLOT_NAME, markdown, save_figure, task_panels, write_results
from fcache.train_heads.runfolder import CONFIG, RunDir

LOSS_PLOT = "losses.png"
REPORT = "report.md"


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """RUN folders named by ``paths``: each path is a RUN folder, or a folder holding RUN folders (a multi-head
    ``--out``, a sweep's output folder or its ``runs/``), searched two levels down. Duplicates are kept once.

    Raises:
        ValueError: a path does not exist or holds no RUN folder.
    """
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise InputError(f"{p} is not a folder; pass RUN folders (the --out of train-head) or folders that hold them")
        if (p / CONFIG).is_file():
            found[p.resolve()] = None
            continue
        inside = sorted(c.parent for c in [*p.glob(f"*/{CONFIG}"), *p.glob(f"*/*/{CONFIG}")])
        if not inside:
            raise InputError(f"{p} holds no fcache run folder (no {CONFIG} in it or two levels below)")
        found |= dict.fromkeys(c.resolve() for c in inside)
    if not found:
        raise InputError("no RUN folder given")
    return list(found)


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


def plot_losses(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss against iteration, one panel per task, one line per run (log scale when it spans a decade)."""
    fig, panels = task_panels(rows, 6.5)
    for ax, task, mine in panels:
        values: list[float] = []
        mine = list({r["run"]: r for r in mine}.values())  # a run evaluated on several stores: one curve
        for row, label in zip(mine, _labels(mine), strict=True):
            points = loss_curves(row["run"])
            if points:
                ax.plot([i for i, _ in points], [v for _, v in points], label=label, lw=1.2)
                values += [v for _, v in points]
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 10:
            ax.set_yscale("log")
        ax.set(xlabel="iteration", ylabel="training loss", title=task)
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path, legend_size=7)


def write_report(paths: Iterable[str | Path], out: str | Path) -> dict[str, Any]:
    """results.csv / results.md / results.png / losses.png / report.md for the RUN folders under ``paths``.

    Returns a summary: the output files and the rows.

    Raises:
        ValueError: a path that is not a RUN folder and holds none, or an unreadable one.
    """
    runs = find_runs(paths)
    out = Path(out)
    rows = write_results(runs, out)
    plot_losses(rows, out / LOSS_PLOT)
    unevaluated = [Path(r["run"]).name for r in rows if r["value"] is None]
    n_runs = len({r["run"] for r in rows})
    text = [
        f"# fcache report: {n_runs} run(s)",
        "",
        "Metrics in percent (the task's main metric in `value`), trainable parameters in millions, `time s` the",
        "seconds spent training over all sessions of a run; `eval store` is the store a row's metrics come from (a run",
        "evaluated on several stores has a row for each).",
        "",
        markdown(rows),
        f"![metric against trainable parameters]({PLOT_NAME})",
        "",
        f"![training loss]({LOSS_PLOT})",
        "",
    ]
    if unevaluated:
        text += [f"Not evaluated yet (no metric): {', '.join(unevaluated)}; run `fcache eval RUN --store VAL`.", ""]
    (out / REPORT).write_text("\n".join(text))
    files = {k: str(out / n) for k, n in (("csv", CSV_NAME), ("md", MARKDOWN_NAME), ("png", PLOT_NAME), ("losses", LOSS_PLOT))}
    return {"out": str(out), "runs": n_runs, "files": files | {"report": str(out / REPORT)}, "rows": rows}


def format_report(summary: dict[str, Any]) -> str:
    """What ``fcache report`` prints: the table and where the files are."""
    return "\n".join([markdown(summary["rows"]).rstrip(), "", "report: " + ", ".join(summary["files"].values())])
