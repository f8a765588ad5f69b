"""``fcache report RUN... --out DIR``: an ablation at a glance from any RUN folders (train-head, a multi-head pass,
a sweep): the leaderboard (one table per task, ranked by its main metric, seeds as mean ± std), the results table of
every run (CSV and Markdown), the metric against trainable parameters, the loss curves (PNG and PDF), per-class tables
with ``--per-class``, and a ``report.md`` that shows them together.

Reads RUN folders only (``config.json``, ``metrics.jsonl``, ``eval/<store>/``), so it works on runs trained anywhere,
any time. The report folder is fcache's (``common.outputs.OwnedFolder``, marker ``.fcache-report.json``): a later report
replaces the files a report wrote there while they are unchanged; a folder holding anything else (a file of the user's,
one edited since) is refused before anything is written (:func:`check_out`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fcache.common.errors import InputError
from fcache.common.outputs import OwnedFolder
from fcache.train_heads.analysis import leaderboard as lb
from fcache.train_heads.analysis.figures import loss_curves, plot_losses, plot_metric
from fcache.train_heads.analysis.results import CSV_NAME, MARKDOWN_NAME, collect, main_metric, write_results
from fcache.train_heads.runfolder import CONFIG

LOSS_PLOT, METRIC_PLOT, REPORT = "losses.png", "results.png", "report.md"
WRITTEN = ".fcache-report.json"  # the report folder's marker: the files the last report wrote, with their sha256
REPORT_TITLE = "# fcache report: "  # how report.md begins (a folder of an earlier release, without WRITTEN, is told by it)

REPORT_FILES = (
    *(lb.LEADERBOARD_MD, lb.LEADERBOARD_CSV, CSV_NAME, MARKDOWN_NAME, lb.PER_CLASS_MD, REPORT),
    *(name for png in (METRIC_PLOT, LOSS_PLOT) for name in (png, str(Path(png).with_suffix(".pdf")))),
)  # every file a report may write

__all__ = ["check_out", "find_runs", "format_report", "loss_curves", "write_outputs", "write_report"]


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


def entry_record(e: lb.Entry) -> dict[str, Any]:
    """A leaderboard entry as JSON: metrics as evaluation gives them (fractions, metres), each with its mean and std over
    the entry's seeds."""
    metrics = {m: {"mean": e.mean(m), "std": e.std(m)} for m in lb.metric_columns(e.task, [e])}
    return {
        "task": e.task,
        "rank": e.rank,
        "head": e.head,
        "settings": e.settings,
        "eval_store": e.eval_store,
        "eval_name": e.eval_name,
        "n": e.n,
        "n_runs": e.n_runs,
        "seeds": e.seeds,
        "metric": main_metric(e.task),
        "value": e.mean(main_metric(e.task)),
        "std": e.std(main_metric(e.task)),
        "metrics": metrics,
        "trainable_params": e.trainable_params,
        "time_s": e.mean("time_s"),
        "s_per_iter": e.mean("s_per_iter"),
        "peak_mem_gb": max(e.values("peak_mem_gb"), default=None),
        "runs": [r["run"] for r in e.rows],
    }


def _previous_release(out: Path) -> list[str]:
    """The files a report of the previous release wrote into ``out`` (it recorded none): all a report writes, when its
    report.md is fcache's."""
    try:
        ours = (out / REPORT).read_text().startswith(REPORT_TITLE)
    except (OSError, UnicodeDecodeError):
        ours = False
    return list(REPORT_FILES) if ours else []


def report_folder(out: str | Path, keep: Sequence[str] = ()) -> OwnedFolder:
    """The report folder ``out`` (``common.outputs.OwnedFolder``, marker ``.fcache-report.json``); ``keep``: names in it
    that are the caller's own (a sweep's ``runs``)."""
    return OwnedFolder(out, "--out", WRITTEN, who="fcache report", keep=keep, legacy=_previous_release)


def check_out(out: str | Path, keep: Sequence[str] = ()) -> None:
    """Refuse a report folder that cannot be written or holds anything an earlier report did not write there (or that
    changed since), before anything is written; ``keep``: names in it that are the caller's own (a sweep's ``runs``).

    Raises:
        InputError: naming the folder and what it holds of the user's.
    """
    report_folder(out, keep).check()


def write_outputs(runs: Sequence[str | Path], out: str | Path, *, per_class: bool = False, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Every report file for the RUN folders ``runs`` in ``out`` (checked first: :func:`check_out`, ``keep`` the
    caller's own names in it); returns a summary: the files, rows and leaderboard."""
    out = Path(out)
    folder = report_folder(out, keep)
    folder.check()
    damaged: dict[str, str] = {}
    rows = collect(runs, damaged)
    if len(damaged) == len(runs):  # nothing to show: nothing is written
        raise InputError(f"no RUN folder can be read: {'; '.join(damaged.values())}")
    folder.claim(REPORT_FILES)
    write_results(rows, out)
    board = lb.entries(rows)
    (out / lb.LEADERBOARD_MD).write_text(lb.markdown(board))
    lb.write_csv(board, out / lb.LEADERBOARD_CSV)
    plot_metric(board, out / METRIC_PLOT)
    plot_losses(rows, out / LOSS_PLOT)
    files = {"leaderboard": out / lb.LEADERBOARD_MD, "leaderboard_csv": out / lb.LEADERBOARD_CSV}
    files |= {"csv": out / CSV_NAME, "md": out / MARKDOWN_NAME}
    for name, png in (("png", METRIC_PLOT), ("losses", LOSS_PLOT)):
        files |= {name: out / png, f"{name}_pdf": (out / png).with_suffix(".pdf")}
    tables = lb.per_class(board) if per_class else []
    if per_class:
        (out / lb.PER_CLASS_MD).write_text(lb.per_class_markdown(tables))
        files["per_class"] = out / lb.PER_CLASS_MD
    (out / REPORT).write_text(_report_md(rows, board, tables if per_class else None, damaged))
    files["report"] = out / REPORT
    folder.record(p.name for p in files.values())
    return {
        "out": str(out),
        "runs": len({r["run"] for r in rows}),
        "damaged": damaged,
        "files": {k: str(v) for k, v in files.items()},
        "leaderboard": [entry_record(e) for mine in board.values() for e in mine],
        "rows": rows,
    }


def _report_md(rows: Sequence[dict[str, Any]], board: dict[str, list[lb.Entry]], tables: list[Any] | None, damaged: dict[str, str]) -> str:
    unevaluated = sorted({Path(r["run"]).name for r in rows if r["value"] is None})
    text = [
        f"{REPORT_TITLE}{len({r['run'] for r in rows})} run(s)",
        "",
        "Runs that differ only in their seed are one line: metrics (in percent where a title says %) as mean ± standard",
        "deviation over its runs; n the distinct seeds (and the runs, where a seed repeats: a copied RUN, a seed trained",
        "twice); parameters in millions; train time the mean seconds spent training over all sessions of a run, s/iter that",
        "over its iterations, peak memory the largest the runs recorded (CUDA: allocated tensors; CPU: the process's peak",
        "resident set). `eval store` is the store the metrics come from (one line per store; stores of one name that differ",
        "are told apart as `<name>-<fingerprint[:8]>`, the name a RUN gives their evaluation folders).",
        "",
        lb.markdown(board),
        f"![metric against trainable parameters]({METRIC_PLOT})",
        "",
        f"![training loss]({LOSS_PLOT})",
        "",
        f"Every run and metric: [{MARKDOWN_NAME}]({MARKDOWN_NAME}), [{CSV_NAME}]({CSV_NAME}).",
        "",
    ]
    if tables is not None:
        text += ["## Per class", "", lb.per_class_markdown(tables)]
    if unevaluated:
        text += [f"Not evaluated yet (no metric): {', '.join(unevaluated)}; run `fcache eval RUN --store VAL`.", ""]
    if damaged:
        text += ["Damaged (left out, their records cannot be read):", "", *(f"- {run}: {why}" for run, why in damaged.items()), ""]
    return "\n".join(text)


def write_report(paths: Iterable[str | Path], out: str | Path, *, per_class: bool = False) -> dict[str, Any]:
    """The report files for the RUN folders under ``paths`` (see :func:`write_outputs`).

    Raises:
        ValueError: a path that is not a RUN folder and holds none, or an unreadable one.
    """
    return write_outputs(find_runs(paths), out, per_class=per_class)


def format_report(summary: dict[str, Any]) -> str:
    """What ``fcache report`` prints: the leaderboard, the per-class tables when written, and where the files are."""
    files = summary["files"]
    text = [Path(files["leaderboard"]).read_text().rstrip()]
    if "per_class" in files:
        text += ["", Path(files["per_class"]).read_text().rstrip()]
    text += [f"damaged, left out: {run}: {why}" for run, why in summary.get("damaged", {}).items()]
    return "\n".join([*text, "", "report: " + ", ".join(files.values())])
