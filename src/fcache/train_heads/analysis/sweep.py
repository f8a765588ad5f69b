"""``fcache sweep SPEC.yaml``: a grid of head-training variants, trained in sequence or one per dask worker, then
the report of ``fcache report`` over the finished ones (leaderboard, results.csv/md, results.png: the paper's Figures
1 and 4 from one file, losses.png).

Every variant is an ordinary ``train-head`` run in ``OUT/runs/<head>-<hash of its configuration>``, so a rerun finds
finished variants (skipped), unfinished ones (resumed from their checkpoint) and new ones (trained) by name alone.
The SPEC schema is documented in the README ("Sweeps") and enforced by :func:`load_spec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fcache.common.cluster import ClusterTarget, connect, worker_threads
from fcache.common.errors import InputError
from fcache.common.flags import flags_of, setting_value
from fcache.store import FeatureStore
from fcache.store.backends import is_url
from fcache.train_heads.analysis.report import check_out, write_outputs
from fcache.train_heads.config import RENAMED, SweepConfig, TrainConfig
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.training import echo, folder_name, prepare_training, run_train

# Every train-head setting is a key (``out`` and ``resume`` are the sweep's to set: each variant resumes in its folder).
SETTINGS: dict[str, tuple[dataclasses.Field, Any]] = {
    f.name: (f, typing.get_type_hints(TrainConfig)[f.name]) for f, _ in flags_of(TrainConfig) if f.name not in ("out", "resume")
}
GRID_KEYS = ("store", "head", "lr", "train_fraction", "weight_decay", "seed", "batch_size")  # a list = one grid axis
SWEEP_KEYS = ("out", "threads")  # of the sweep itself, not of a variant
SPEC_KEYS = (*SETTINGS, *SWEEP_KEYS)
PATH_KEYS = ("store", "val_store", "out", "cache_dir")  # relative to the SPEC file
RUNS = "runs"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed SPEC: grid axes (key -> values, GRID_KEYS order) and the values every variant shares."""

    path: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    fixed: tuple[tuple[str, Any], ...]
    out: str = ""
    threads: int | None = None

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid values, with the shared values: one dict of TrainConfig fields each.

        A ``store`` value may be a (store, val_store) pair: ``val_store`` given as a list paired with ``store``'s.
        """
        keys = [k for k, _ in self.grid]
        out = []
        for combo in itertools.product(*(v for _, v in self.grid)):
            point = dict(self.fixed) | dict(zip(keys, combo, strict=True))
            if isinstance(point.get("store"), tuple):
                point["store"], point["val_store"] = point["store"]
            out.append(point)
        return out


def _coerce(path: str, key: str, value: Any) -> Any:
    """A SPEC value as its setting's type (``fcache.common.flags.setting_value``); InputError naming the key otherwise."""
    own = {f.name: (f, typing.get_type_hints(SweepSpec)[f.name]) for f in dataclasses.fields(SweepSpec) if f.name in SWEEP_KEYS}
    field, hint = SETTINGS[key] if key in SETTINGS else own[key]
    try:
        return setting_value(field, hint, value)
    except InputError as e:
        raise InputError(f"{path}: {key}: {e}") from None


def _resolve(base: Path, key: str, value: Any) -> Any:
    """Store paths relative to the SPEC file's folder become absolute (dask workers may run elsewhere); URLs stay."""
    if key not in PATH_KEYS or not value or is_url(value):
        return value
    return str((base / value).resolve())


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InputError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must be a YAML mapping of sweep keys (e.g. head: [fpn, bifpn:layers=3]); see the README")
    return data


def load_spec(path: str) -> SweepSpec:
    """Read and check a SPEC file: known keys, required keys, lists only for grid keys, values of the right type.

    Raises:
        ValueError: naming the key and the fix.
    """
    data = {RENAMED.get(k, k): v for k, v in _read_yaml(path).items()}  # a SPEC of an earlier fcache: steps is lr_steps
    unknown = sorted(set(map(str, data)) - set(SPEC_KEYS))
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(SPEC_KEYS))})")
    missing = [k for k in ("store", "head") if data.get(k) in (None, [], "")]
    missing += ["iters"] if all(data.get(k) in (None, []) for k in ("iters", "epochs")) else []
    if missing:
        raise InputError(f"{path}: missing {', '.join(missing)} (e.g. store: train.zarr, head: [fpn], iters: 1000)")
    base = Path(path).resolve().parent
    values = {k: _values(path, base, k, v) for k, v in data.items() if k not in SWEEP_KEYS}
    if isinstance(values.get("val_store"), list):  # paired with the training stores (one validation store per backbone)
        stores = values["store"] if isinstance(values["store"], list) else [values["store"]]
        if len(values["val_store"]) != len(stores):
            raise InputError(f"{path}: val_store lists {len(values['val_store'])} stores for {len(stores)} in store; pair them one to one")
        values["store"] = [tuple(pair) for pair in zip(stores, values.pop("val_store"), strict=True)]
    grid = tuple((k, tuple(values[k])) for k in GRID_KEYS if isinstance(values.get(k), list))
    fixed = tuple((k, v) for k, v in values.items() if not isinstance(v, list))
    out = _resolve(base, "out", _coerce(path, "out", data["out"])) if "out" in data else ""
    threads = _coerce(path, "threads", data["threads"]) if "threads" in data else None
    return SweepSpec(str(path), grid, fixed, out, threads)


def _values(path: str, base: Path, key: str, value: Any) -> Any:
    """One SPEC value, or a list of them (a grid axis; ``val_store`` paired with ``store``), coerced and resolved."""
    if isinstance(value, list) and (key in GRID_KEYS or key == "val_store"):
        if len(value) == 0:
            raise InputError(f"{path}: {key} is an empty list; give at least one value")
        return [_resolve(base, key, _coerce(path, key, v)) for v in value]
    if isinstance(value, list) and typing.get_origin(SETTINGS[key][1]) is not tuple:
        raise InputError(f"{path}: {key} takes one value; lists (grid axes) are allowed for {', '.join(GRID_KEYS)}")
    return _resolve(base, key, _coerce(path, key, value))


def variant_config(values: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of one grid point: the task's defaults for its head under the values the SPEC gives."""
    return with_defaults(TrainConfig.from_flags(**{"out": "", **values}))


@dataclass(frozen=True)
class Variant:
    """One grid point: its RUN folder name, its configuration (``out`` set, resumable) and whether it is done."""

    name: str
    cfg: TrainConfig
    finished: bool


def plan(spec: SweepSpec, out: Path) -> list[Variant]:
    """Every variant checked as ``train-head`` would (stores, head, RUN folder) and named; nothing is written."""
    variants: dict[str, Variant] = {}
    stores: dict[str, FeatureStore] = {}  # each store opened once, however many variants read it
    for values in spec.points():
        cfg = variant_config(values)
        p = prepare_training(cfg, stores)
        record = p.record(cfg.resolved(len(p.indices)))
        digest = hashlib.sha256(json.dumps(record.identity(), sort_keys=True).encode()).hexdigest()[:10]
        name = f"{folder_name(record.head)}-{digest}"
        if name in variants:
            raise InputError(f"{spec.path}: two grid points are the same variant ({cfg.head}); list each head and value once")
        cfg = dataclasses.replace(cfg, out=str(out / RUNS / name), resume=True)
        RunDir(cfg.out).check(record, resume=True)
        variants[name] = Variant(name, cfg, is_finished(cfg.out))
    return list(variants.values())


def is_finished(path: str | Path) -> bool:
    """The RUN folder trained all its iterations (or stopped early) and, when it has a validation store, was evaluated
    after them."""
    run = RunDir(path)
    record = run.read_config()
    if record is None or not (run.path / "model.safetensors").is_file():
        return False
    cfg = record.config
    _, iteration = run.load_model()
    records = run.metrics()
    stopped = any(r.get("event") == "early_stop" and r.get("iter") == iteration for r in records)  # --patience
    evaluated = any(r.get("event") == "eval" and r.get("iter") == iteration for r in records)
    return (iteration == cfg.iters or stopped) and (evaluated or not cfg.val_store)


def run_variant(cfg: TrainConfig, threads: int | None, progress: bool = False) -> dict[str, Any]:
    """Train (or resume) one variant; runs in the sweep's process or on a dask worker. Returns the train-head summary.

    ``threads`` sets torch's intra-op threads for the variant. Inside a daemonic dask worker, which may not start
    processes, the DataLoader reads in-process (``num_workers`` is operational: the result is the same).
    """
    import torch

    c = dataclasses.replace(cfg, num_workers=0) if multiprocessing.current_process().daemon else cfg
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run_train(c, progress=progress, say=lambda m: None)
    finally:
        torch.set_num_threads(before)


@contextmanager
def dask_client(target: ClusterTarget | None) -> Iterator[Any]:
    """A dask Client on ``target``, or None to train in this process."""
    if target is None:
        yield None
        return
    with connect(target) as client:
        yield client


def train_all(variants: Sequence[Variant], client: Any, threads: int | None, progress: bool, say: Callable[[str], None]) -> dict[str, str]:
    """Train ``variants`` in sequence (``client`` None) or one dask task each; returns name -> error of those that failed."""
    failed: dict[str, str] = {}
    if client is None:
        for k, v in enumerate(variants, start=1):
            say(f"[{k}/{len(variants)}] {v.name}")
            try:
                run_variant(v.cfg, threads, progress)
            except Exception as e:  # a failed variant must not stop the sweep; it is reported and retried on rerun
                failed[v.name] = f"{type(e).__name__}: {e}"
        return failed
    from dask.distributed import as_completed

    futures = {client.submit(run_variant, v.cfg, threads, key=f"fcache-sweep-{v.name}", pure=False): v for v in variants}
    for k, future in enumerate(as_completed(futures), start=1):
        name = futures[future].name
        try:
            future.result()
            say(f"[{k}/{len(variants)}] {name} done")
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
    return failed


def default_out(spec: SweepSpec) -> Path:
    """The spec's ``out``, else a folder named after the SPEC file next to it."""
    return Path(spec.out) if spec.out else Path(spec.path).resolve().with_suffix("")


def run_sweep(cfg: SweepConfig, *, progress: bool = True, say: Callable[[str], None] = echo) -> dict[str, Any]:
    """Check every variant, train the unfinished ones, write results.csv/md/png into the output folder; returns a summary.

    Raises:
        ValueError: a bad SPEC, head, store or output folder, before anything is written.
    """
    spec = load_spec(cfg.spec)
    if cfg.device:  # operational: the variants (and their folders) stay those of the SPEC
        spec = dataclasses.replace(spec, fixed=(*((k, v) for k, v in spec.fixed if k != "device"), ("device", cfg.device)))
    out = Path(cfg.out) if cfg.out else default_out(spec)
    own = (RUNS, *([Path(spec.path).name] if Path(spec.path).resolve().parent == out.resolve() else []))  # the SPEC may live in OUT
    check_out(out, keep=own)  # the report's folder, before any variant trains
    variants = plan(spec, out)
    pending = [v for v in variants if not v.finished]
    say(f"{len(variants)} variant(s): {len(variants) - len(pending)} finished already, {len(pending)} to train, in {out}")
    target = cfg.target(spec.threads or 0)
    threads = spec.threads or (worker_threads(target) if target else None)
    with dask_client(target) as client:
        failed = train_all(pending, client, threads, progress and client is None, say) if pending else {}
    report = write_outputs([v.cfg.out for v in variants if is_finished(v.cfg.out)], out, keep=own)
    return {
        "out": str(out),
        "variants": len(variants),
        "skipped": len(variants) - len(pending),
        "trained": len(pending) - len(failed),
        "failed": failed,
        "results": report["files"],
        "leaderboard": report["leaderboard"],
        "rows": report["rows"],
    }


def format_sweep(summary: Mapping[str, Any]) -> str:
    """What ``fcache sweep`` prints: counts, failures, the leaderboard and where the files are."""
    lines = [f"{summary['variants']} variant(s): {summary['skipped']} skipped (finished), {summary['trained']} trained"]
    lines += [f"FAILED {name}: {error}" for name, error in summary["failed"].items()]
    if summary["failed"]:
        lines.append("rerun the same command to retry the failed variants (finished ones are skipped)")
    board = Path(summary["results"]["leaderboard"]).read_text()
    lines += ["", board if summary["rows"] else "(no finished variant)"]
    lines.append("results: " + ", ".join(summary["results"].values()))
    return "\n".join(lines)
