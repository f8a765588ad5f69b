"""The leaderboard of ``fcache report``: one table per task, ranked by the task's main metric (``TaskDef.main_metric``).

Runs whose records differ only in their seed (:func:`fcache.train_heads.analysis.results.variant`) and that were
evaluated on the same store are one entry: each metric is the mean over those runs, with the sample standard deviation
(n - 1 in the denominator; none for n = 1) and n shown. Metrics come in the task's order (``TaskDef.metric_names``: AP,
AP50, ...; mIoU, mAcc, aAcc; RMSE, AbsRel, ...; top1, top5), the main metric's family first, only the families the task
shows (``TaskDef.shown_families``), in percent or as they are (``TaskDef.percent``); the best entry first in the main
metric's direction (``TaskDef.higher_is_better``). The settings column names what differs between entries of one head
(lr, train fraction, training store, ...): a value that only follows the head (its default lr) is told by the head
column. Per-class tables (``--per-class``) read what evaluation wrote into ``RUN/eval/<store>``, as each task says
(``TaskDef.per_class``: per-class AP, IoU, top-1 of the views' mean, per-depth-range scores).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcache.train_heads.analysis.results import main_metric
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.task import TaskDef

LEADERBOARD_CSV, LEADERBOARD_MD, PER_CLASS_MD = "leaderboard.csv", "leaderboard.md", "per_class.md"
IDENTITY_HIDDEN = ("head", "seed", "store_fingerprint")  # shown otherwise (head column), grouped over, or as the store


@dataclass
class Entry:
    """One leaderboard line: the runs of one variant (seeds) scored on one evaluation store."""

    task: str
    head: str
    family: str
    eval_store: str | None
    eval_name: str | None  # how the store is shown (``results.name_eval_stores``)
    rows: list[dict[str, Any]]
    setup: dict[str, Any]  # the variant's identity without head and seed, the training store by name
    settings: dict[str, Any] = field(default_factory=dict)  # what of ``setup`` differs between the task's entries
    rank: int = 0

    @property
    def n(self) -> int:
        """The distinct seeds of its runs (a copied RUN or a seed trained twice adds a run, not a seed)."""
        return len(set(self.seeds))

    @property
    def n_runs(self) -> int:
        return len(self.rows)

    @property
    def shown_n(self) -> str:
        return str(self.n) if self.n == self.n_runs else f"{self.n} ({self.n_runs} runs)"

    @property
    def seeds(self) -> list[int]:
        return sorted(int(r["seed"]) for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return int(self.rows[0]["trainable_params"])

    def values(self, key: str) -> list[float]:
        """The runs' values of ``key`` (metrics: the defined ones, >= 0)."""
        vs = [float(r[key]) for r in self.rows if r.get(key) is not None]
        return [v for v in vs if v >= 0] if "/" in key else vs

    def mean(self, key: str) -> float | None:
        vs = self.values(key)
        return statistics.fmean(vs) if vs else None

    def std(self, key: str) -> float | None:
        vs = self.values(key)
        return statistics.stdev(vs) if len(vs) > 1 else None

    @property
    def label(self) -> str:
        """The head, with the settings that tell it from the task's other entries."""
        return ", ".join([self.head, *(f"{k}={_short(v)}" for k, v in self.settings.items())])


def known(task: str) -> TaskDef | None:
    """The TASKS entry of ``task``; None for a task this fcache does not know (its runs are still listed)."""
    from fcache.train_heads.tasks import TASKS

    return TASKS.get(task)


def higher_is_better(task: str) -> bool:
    t = known(task)
    return t.higher_is_better if t is not None else True


def number_format(task: str) -> tuple[float, int]:
    """(factor, decimals) of the task's metrics in tables (``TaskDef.number_format``; percent for an unknown task)."""
    t = known(task)
    return t.number_format if t is not None else (100.0, 1)


def unit(task: str) -> str:
    return "%, " if number_format(task)[0] == 100.0 else ""


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _setup(row: dict[str, Any]) -> dict[str, Any]:
    record = RunDir(row["run"]).require_config()
    identity = {k: v for k, v in record.config.identity().items() if k not in IDENTITY_HIDDEN}
    return {"store": Path(str(row["store"]).rstrip("/")).name, **identity}


def _varies(mine: Sequence[Entry], key: str) -> bool:
    """Whether two entries of one head differ in ``key`` (a value that only follows the head, as its default lr, is the
    head's: the head column tells it)."""
    seen: dict[str, set[str]] = {}
    for e in mine:
        seen.setdefault(e.head, set()).add(json.dumps(e.setup.get(key), sort_keys=True))
    return any(len(values) > 1 for values in seen.values())


def entries(rows: Sequence[dict[str, Any]]) -> dict[str, list[Entry]]:
    """task -> its entries, ranked: best mean main metric first in its direction (runs without one last), fewer parameters
    first on a tie."""
    groups: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"], r.get("eval_name", r.get("eval_store"))), []).append(r)
    out: dict[str, list[Entry]] = {}
    for (task, _, name), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        first = members[0]
        out.setdefault(task, []).append(Entry(task, first["head"], first["family"], first.get("eval_store"), name, members, _setup(first)))
    for task, mine in out.items():
        varying = [k for k in mine[0].setup if _varies(mine, k)]
        metric, sign = main_metric(task), (1.0 if higher_is_better(task) else -1.0)
        for e in mine:
            e.settings = {k: e.setup.get(k) for k in varying}
        mine.sort(key=lambda e: (e.mean(metric) is None, -sign * (e.mean(metric) or 0.0), e.trainable_params, e.label))
        for k, e in enumerate(mine, start=1):
            e.rank = k
    return dict(sorted(out.items()))


def metric_columns(task: str, mine: Sequence[Entry]) -> list[str]:
    """The metrics the task's table shows: the main metric's family first, then the others shown, each in the task's order."""
    t = known(task)
    main = main_metric(task)
    shown, order_of = (t.shown_families, t.metric_names) if t is not None else ((), ())
    keys = {k for e in mine for r in e.rows for k in r if "/" in k}
    families = sorted({k.partition("/")[0] for k in keys}, key=lambda f: (f != main.partition("/")[0], f))
    families = [f for f in families if not shown or f in shown or f == main.partition("/")[0]]

    def order(name: str) -> tuple[int, str]:
        return (order_of.index(name) if name in order_of else len(order_of), name)

    return [f"{f}/{n}" for f in families for n in sorted((k.partition("/")[2] for k in keys if k.startswith(f + "/")), key=order)]


def _pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """``45.2 ± 0.3`` (percent by default: ``scale``, ``digits`` from ``number_format``); ``-`` without a value."""
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _number(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(task: str, mine: Sequence[Entry]) -> list[list[str]]:
    """The task's leaderboard as rows of cells, the header first."""
    metrics = metric_columns(task, mine)
    scale, digits = number_format(task)
    with_settings = any(e.settings for e in mine)
    header = ["#", "head", *(["settings"] if with_settings else []), "eval store", "n", *metrics]
    header += ["params (M)", "train time", "s/iter", "peak mem (GB)"]
    out = [header]
    for e in mine:
        settings = [", ".join(f"{k}={_short(v)}" for k, v in e.settings.items())] if with_settings else []
        store = e.eval_name or "(not evaluated)"
        cells = [str(e.rank), e.head, *settings, store, e.shown_n, *(_pm(e.mean(m), e.std(m), scale, digits) for m in metrics)]
        cells += [f"{e.trainable_params / 1e6:.2f}", _duration(e.mean("time_s")), _number(e.mean("s_per_iter"), "#.3g")]
        cells.append(_number(max(e.values("peak_mem_gb"), default=None), ".2f"))
        out.append(cells)
    return out


def markdown_table(cells: Sequence[Sequence[str]]) -> str:
    """A Markdown table of rows of cells (the first is the header), columns padded to line up."""
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])]) + "\n"


def markdown(board: dict[str, list[Entry]]) -> str:
    """Every task's table under a heading that names its ranking metric."""
    parts = []
    for task, mine in board.items():
        over = "n seeds" if all(e.n == e.n_runs for e in mine) else "a line's runs; n: its seeds, and runs where a seed repeats"
        title = f"### {task}: ranked by {main_metric(task)} ({unit(task)}mean ± std over {over})"
        parts += [title, "", markdown_table(table(task, mine))]
    return "\n".join(parts)


def write_csv(board: dict[str, list[Entry]], path: str | Path) -> Path:
    """One line per entry: rank, head, settings, eval store, n, seeds, each metric's mean and std (fractions), costs."""
    lines = []
    for task, mine in board.items():
        metrics = metric_columns(task, mine)
        for e in mine:
            line: dict[str, Any] = {"task": task, "rank": e.rank, "head": e.head, "settings": json.dumps(e.settings, sort_keys=True)}
            line |= {"eval_store": e.eval_store or "", "eval_name": e.eval_name or "", "n": e.n, "n_runs": e.n_runs}
            line |= {"seeds": " ".join(map(str, e.seeds)), "metric": main_metric(task)}
            for m in metrics:
                line |= {m: e.mean(m), f"{m} std": e.std(m)}
            line |= {"trainable_params": e.trainable_params, "time_s": e.mean("time_s"), "s_per_iter": e.mean("s_per_iter")}
            line |= {"peak_mem_gb": max(e.values("peak_mem_gb"), default=None), "runs": " ".join(r["run"] for r in e.rows)}
            lines.append(line)
    names = list(dict.fromkeys(k for line in lines for k in line))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in line.items()} for line in lines)
    return Path(path)


# -- per-class tables -------------------------------------------------------------------------------


def eval_dir(row: dict[str, Any]) -> Path | None:
    """The folder the row's evaluation wrote its files into (None for a row not evaluated, or evaluated before fcache
    recorded it)."""
    run = RunDir(row["run"])
    evals = [r for r in run.metrics() if r.get("event") == "eval" and str(r.get("store", "")) == str(row.get("eval_store"))]
    where = evals[-1].get("eval_dir") if evals else None
    return run.path / where if where else None


def per_class(board: dict[str, list[Entry]]) -> list[tuple[str, list[list[str]]]]:
    """(title, cells) per task, evaluation store and per-class metric: a row per class, a column per entry (mean ± std
    over its seeds, as the task's tables show them); '-' where a class has no value (no ground truth, never predicted)."""
    out = []
    for task, mine in board.items():
        t = known(task)
        if t is None:
            continue
        read, (scale, digits) = t.per_class, t.number_format
        by_store: dict[str, dict[str, dict[int, list[dict[str, float | None]]]]] = {}  # store -> metric -> rank -> per run
        for e in mine:
            for r in e.rows:
                folder = eval_dir(r) if e.eval_store else None
                for metric, values in (read(folder) if folder is not None else {}).items():
                    by_store.setdefault(str(e.eval_name), {}).setdefault(metric, {}).setdefault(e.rank, []).append(values)
        for store, metrics in by_store.items():
            for metric, per_entry in metrics.items():
                ranked = [e for e in mine if e.rank in per_entry]
                classes = list(dict.fromkeys(c for e in ranked for values in per_entry[e.rank] for c in values))
                cells = [["class", *(f"#{e.rank} {e.label}" for e in ranked)]]
                for c in classes:
                    row = [c]
                    for e in ranked:
                        vs = [float(x) for v in per_entry[e.rank] if (x := v.get(c)) is not None]
                        mean, std = statistics.fmean(vs) if vs else None, statistics.stdev(vs) if len(vs) > 1 else None
                        row.append(_pm(mean, std, scale, digits))
                    cells.append(row)
                shown = " (%)" if scale == 100.0 else ""
                out.append((f"#### {task}: {metric} on {store}{shown}", cells))
    return out


def per_class_markdown(tables: Sequence[tuple[str, list[list[str]]]]) -> str:
    if not tables:
        return "No per-class results: evaluate the runs (`fcache eval RUN --store VAL`) to write them.\n"
    return "\n".join(f"{title}\n\n{markdown_table(cells)}" for title, cells in tables)
