"""Results of many runs: one row per RUN folder and evaluation store, written as CSV and Markdown (every setting and
metric, the raw material of the leaderboard and figures), and the figure helpers they share.

Reads RUN folders only (config.json, metrics.jsonl), so it serves ``fcache sweep`` and any later report alike.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fcache.common.errors import FcacheError, InputError
from fcache.common.records import read_json
from fcache.train_heads.runfolder import EVAL_STORE, RunDir
from fcache.train_heads.runrecord import EvalStore, TrainingRecord

COLUMNS = (
    "run",
    "task",
    "head",
    "family",
    "trainable_params",
    "lr",
    "train_fraction",
    "store",
    "eval_store",
    "eval_fingerprint",
    "eval_name",
    "iters",
    "seed",
    "metric",
    "value",
    "time_s",
    "s_per_iter",
    "peak_mem_gb",
    "variant",
)
CSV_NAME, MARKDOWN_NAME = "results.csv", "results.md"


def main_metric(task: str) -> str:
    """The metric that ranks runs of ``task`` (its TASKS entry); "metric" for a task this fcache does not know."""
    from fcache.train_heads.tasks import TASKS

    return TASKS[task].main_metric if task in TASKS else "metric"


def head_family(head: str) -> str:
    """A plot series: the head's name and its non-numeric keys (``bifpn:layers=3,roi=cascade`` -> ``bifpn:roi=cascade``)."""
    name, _, rest = head.partition(":")
    kept = [pair for pair in filter(None, rest.split(",")) if not _is_number(pair.partition("=")[2])]
    return name + (":" + ",".join(sorted(kept)) if kept else "")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def training_seconds(records: Iterable[dict[str, Any]]) -> float:
    """Seconds spent training over every session of a run (``time_s`` restarts at 0 when a run is resumed)."""
    total = last = 0.0
    for r in records:
        if "time_s" not in r:
            continue
        if r["time_s"] < last:
            total += last
        last = r["time_s"]
    return round(total + last, 3)


def peak_memory(records: Iterable[dict[str, Any]]) -> float | None:
    """The largest ``peak_mem_gb`` the run's training records hold (None for runs trained before fcache recorded it)."""
    peaks = [float(r["peak_mem_gb"]) for r in records if r.get("peak_mem_gb") is not None]
    return max(peaks) if peaks else None


def last_iteration(records: Iterable[dict[str, Any]]) -> int:
    """The last iteration the run's training records reach (0 before the first one)."""
    return max((int(r["iter"]) for r in records if r.get("event") is None and "iter" in r), default=0)


def variant(record: TrainingRecord) -> str:
    """What runs that differ only in their seed share: a digest of the record's identity without the seed."""
    identity = {k: v for k, v in record.identity().items() if k != "seed"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of the RUN folder ``path``: one per store it was evaluated on (its last evaluation there), in the order
    they were first evaluated; one row without metrics (``value`` and ``eval_store`` None) for a run not evaluated yet."""
    run = RunDir(path)
    last: dict[str, dict[str, Any]] = {}
    for r in run.metrics():
        if r.get("event") == "eval":
            last[str(r.get("store", ""))] = r
    return [run_row(path, store) for store in last] or [run_row(path)]


def run_row(path: str | Path, eval_store: str | None = None) -> dict[str, Any]:
    """One row for the RUN folder ``path``: configuration, trainable parameters, the metrics of its last evaluation on
    ``eval_store`` (default: its last evaluation on any store), time.

    ``value`` is the task's main metric (``TaskDef.main_metric``); every metric of the evaluation follows as its own column,
    and ``eval_store`` says which store they come from. A run not evaluated yet has no metrics (``value`` None).
    """
    run = RunDir(path)
    record = run.require_config()
    cfg, records = record.config, run.metrics()
    evals = [r for r in records if r.get("event") == "eval" and (eval_store is None or str(r.get("store", "")) == eval_store)]
    metrics = {k: v for k, v in evals[-1].items() if "/" in k} if evals else {}
    metric = main_metric(cfg.task)
    seconds, done = training_seconds(records), last_iteration(records)
    row = {
        "run": str(run.path),
        "task": cfg.task,
        "head": cfg.head,
        "family": head_family(cfg.head),
        "trainable_params": record.trainable_params,
        "lr": cfg.lr,
        "train_fraction": cfg.train_fraction,
        "store": cfg.store,
        "eval_store": evals[-1].get("store") if evals else None,
        "eval_fingerprint": eval_fingerprint(run, evals[-1]) if evals else None,
        "iters": cfg.iters,
        "seed": cfg.seed,
        "metric": metric,
        "value": metrics.get(metric),
        "time_s": seconds,
        "s_per_iter": round(seconds / done, 4) if done and seconds else None,
        "peak_mem_gb": peak_memory(records),
        "variant": variant(record),
    }
    return row | dict(sorted(metrics.items()))


def eval_fingerprint(run: RunDir, evaluation: dict[str, Any]) -> str | None:
    """The fingerprint of the store ``evaluation`` (a metrics.jsonl record) scored, from its folder's store.json; None
    for an evaluation of a release that did not record it."""
    where = evaluation.get("eval_dir")
    known = run.path / str(where) / EVAL_STORE if where else None
    if known is None or not known.is_file():
        return None
    return EvalStore.from_dict(read_json(known, InputError), str(known)).fingerprint


def store_name(path: str) -> str:
    return Path(str(path).rstrip("/")).name


def name_eval_stores(rows: Sequence[dict[str, Any]]) -> None:
    """Set each row's ``eval_name``, the name its evaluation store is shown by: the store's folder name (``val.zarr``),
    or where stores of one name differ (their fingerprints), the name the RUN gives its evaluation folder of each
    (``val-<fingerprint[:8]>``; the path for an evaluation that recorded no fingerprint). None: not evaluated."""
    stores: dict[str, set[str]] = {}
    for r in rows:
        if r["eval_store"]:
            stores.setdefault(store_name(r["eval_store"]), set()).add(r["eval_fingerprint"] or r["eval_store"])
    for r in rows:
        name = store_name(r["eval_store"]) if r["eval_store"] else None
        if name is None or len(stores[name]) == 1:
            r["eval_name"] = name
        else:
            fp = r["eval_fingerprint"]
            r["eval_name"] = f"{name.removesuffix('.zarr')}-{fp[:8]}" if fp else str(r["eval_store"])


def collect(runs: Iterable[str | Path], damaged: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of the RUN folders ``runs``, sorted by task, family, trainable parameters, lr, train fraction and store.

    A RUN whose records cannot be read gets no row: with ``damaged`` given, its path -> why goes there; without, its
    error is raised.
    """
    rows = []
    for p in runs:
        try:
            rows += run_rows(p)
        except FcacheError as e:
            if damaged is None:
                raise
            damaged[str(p)] = str(e)
    name_eval_stores(rows)
    return sorted(rows, key=lambda r: (r["task"], r["family"], r["trainable_params"], r["lr"], r["train_fraction"], r["store"]))


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """COLUMNS, then every metric any row has (sorted)."""
    return list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The rows as CSV (metrics as fractions, empty where a run has none)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return Path(path)


def _shown(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key == "trainable_params":
        return f"{value / 1e6:.2f} M"
    if key == "run":
        return Path(value).name
    if key in ("store", "eval_store"):
        return store_name(value)
    if "/" in key or key == "value":
        return "-" if value < 0 else f"{100 * value:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the rows: metrics in percent, parameters in millions, run and store by folder name (the
    evaluation store by its ``eval_name``)."""
    cols = [c for c in columns(rows) if c not in ("eval_fingerprint", "eval_name")]
    shown = lambda r, c: str(r["eval_name"]) if c == "eval_store" and r.get("eval_name") else _shown(c, r.get(c))  # noqa: E731
    lines = ["| " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(shown(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    Path(path).write_text(markdown(rows))
    return Path(path)


def task_panels(rows: Sequence[dict[str, Any]], panel_width: float) -> tuple[Any, list[tuple[Any, str, list[dict[str, Any]]]]]:
    """A matplotlib figure with one panel per task of ``rows``: (figure, [(axes, task, that task's rows)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows}) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(panel_width * len(tasks), 4.2), squeeze=False)
    return fig, [(ax, task, [r for r in rows if r["task"] == task]) for ax, task in zip(axes[0], tasks, strict=True)]


def save_figure(fig: Any, path: str | Path, legend_size: int) -> Path:
    """Legends on the panels that have lines, then the figure written to ``path`` (PNG) and beside it as PDF, and closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.savefig(Path(path).with_suffix(".pdf"))
    plt.close(fig)
    return Path(path)


def write_results(rows: Sequence[dict[str, Any]], out: str | Path) -> None:
    """``rows`` (``collect``'s) written into ``out`` as results.csv and results.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / CSV_NAME)
    write_markdown(rows, out / MARKDOWN_NAME)


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows read back from a results.csv (numbers parsed; metrics and value None where empty)."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse(text: str) -> Any:
    if text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
