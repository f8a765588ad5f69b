"""Compact stores: bits per stored value against the cost in head quality, for every stored form (issue 22, section 3).

For each set of compact_sets.py (detection, segmentation, video), features are extracted once losslessly (fp32) and
recoded (`fcache recode`, no backbone) into every other row of the dtype table and into the forms `--max-error` picks
per level at a few budgets. Per form:
- bits per stored value (side data included: the committed units' shards and scales, a projected form's basis, over
  their values) and the ratio to bf16 raw (16 bits);
- relative RMSE and linear CKA (minibatch-unbiased, examples = sample-views; the lowest over levels) of the val
  features against the lossless ones;
- (a) the main metric of the head trained on the lossless store (seed 0), evaluated on the form's val store;
- (b) heads trained on the form's train store and evaluated on its val store, mean +- std over --seeds, for the forms
  that matter: lossless, the most exact form within 2 bits per value, and the lowest-bit form (a form with the same
  form per level as one of those shares its figures).
A form meets the goal when it is >= 8x smaller than bf16 raw (<= 2 bits per value), its (a) loses at most the set's
allowance (0.02 AP50, one mIoU point, one top-1 point) and its (b) lies within one std of lossless.
--demo runs the demo check instead: `fcache demo`, its val images extracted with the demo's flags plus --demo-flags,
bits per value from the store and `fcache eval` of the demo's RUN on it against the fp16 val store.
Usage: python benchmarks/compact.py [--sets detection,segmentation,video] [--seeds 3] [--scale 1] [--iters-scale 1]
       python benchmarks/compact.py --demo [--demo-flags "--max-error 0.25"]
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compact_sets import LOSSLESS, SETS, SetDef, lossless_stores  # noqa: E402

from common import save, table  # noqa: E402
from fcache import store as fstore  # noqa: E402
from fcache.store.dtypes import DTYPES  # noqa: E402
from fcache.store.recode import feature_bytes, recode  # noqa: E402
from fcache.train_heads.analysis.cka import MinibatchCKA  # noqa: E402
from fcache.train_heads.config import EvalConfig, TrainConfig  # noqa: E402
from fcache.train_heads.evaluation import run_eval  # noqa: E402
from fcache.train_heads.training import run_train  # noqa: E402

BF16_BITS = 16
GOAL_BITS = 2.0
CKA_BATCH = 8
BUDGETS = (0.05, 0.1, 0.25)  # --max-error picks measured beside the fixed forms


@dataclass(frozen=True)
class Form:
    """A candidate stored form: its label in the table and how `fcache recode` makes it."""

    label: str
    recode: dict[str, Any]


def candidates() -> list[Form]:
    """Every row of the dtype table but the lossless reference (new rows join by themselves), then the forms
    ``--max-error`` picks per level at a few budgets."""
    rows = [Form(name, {"dtype": name}) for name in DTYPES if name != LOSSLESS]
    return rows + [Form(f"max-error {e:g}", {"max_error": e}) for e in BUDGETS]


def bits_per_value(path: Path) -> tuple[float, dict[str, float]]:
    """Bits per stored value of the store at ``path``: over all levels, and per level."""
    s = fstore.FeatureStore(path)
    size = feature_bytes(s)
    committed = sum(r.samples for r in s.ledger.values())
    values = {lv.name: committed * s.num_views * math.prod(s.manifest.level_shape(lv.name)) for lv in s.levels}
    return 8 * sum(size.values()) / sum(values.values()), {k: 8 * size[k] / values[k] for k in values}


def fidelity(lossless: Path, form: Path) -> tuple[float, float]:
    """Relative RMSE (all levels) and the lowest linear CKA over levels of ``form``'s features against ``lossless``'s."""
    a, b = fstore.FeatureStore(lossless), fstore.FeatureStore(form)
    err = ref = 0.0
    ckas = []
    for lv in a.level_names:
        x = np.asarray(a.to_dask(lv).compute()[a.ok_indices], np.float64)
        y = np.asarray(b.to_dask(lv).compute()[a.ok_indices], np.float64)
        err += float(np.square(y - x).sum())
        ref += float(np.square(x).sum())
        x, y = x.reshape(-1, math.prod(x.shape[2:])), y.reshape(-1, math.prod(y.shape[2:]))  # one example per sample-view
        cka = MinibatchCKA(["lossless", "form"])
        for rows in np.array_split(np.arange(len(x)), max(1, len(x) // CKA_BATCH)):  # minibatches of 8 to 15 examples (at least 4)
            cka.update({"lossless": torch.from_numpy(x[rows]), "form": torch.from_numpy(y[rows])})
        ckas.append(float(cka.matrix()[0, 1]))
    return math.sqrt(err / ref), min(ckas)


def train(s: SetDef, store: Path, val: Path, out: Path, seed: int, iters_scale: float) -> float:
    """Train the set's head on ``store`` with ``seed``; its main metric on ``val``. A run finished before in ``out``
    (``--keep`` of an earlier, interrupted benchmark) is evaluated instead of trained again."""
    if (out / "model.safetensors").is_file():
        return evaluate(s, out, val)
    fields = {"num_workers": 0, "device": "cpu", "logger": "none", "log_every": 50, **s.train}
    fields["iters"] = max(1, round(fields["iters"] * iters_scale))
    fields |= {"checkpoint_every": fields["iters"], "warmup": min(fields.get("warmup") or 0, fields["iters"] // 5)}
    cfg = TrainConfig(store=str(store), out=str(out), head=s.head, task=s.task, seed=seed, val_store=str(val), **fields)
    return float(run_train(cfg, progress=False, say=lambda m: None)["eval"][s.metric])


def evaluate(s: SetDef, run: Path, store: Path) -> float:
    return float(run_eval(EvalConfig(run=str(run), store=str(store), num_workers=0, device="cpu"), progress=False)["metrics"][s.metric])


def measure_set(s: SetDef, root: Path, seeds: int, scale: float, iters_scale: float) -> list[dict[str, Any]]:
    """One row per form (lossless first): size, fidelity, (a) and, for the forms that matter, (b)."""
    t = time.perf_counter()
    stores = {LOSSLESS: lossless_stores(s, root, scale)}
    for form in candidates():
        stores[form.label] = tuple(recode(stores[LOSSLESS][k], root / f"{split}-{form.label}.zarr", **form.recode).destination
                                   for k, split in enumerate(("train", "val")))  # fmt: skip
    print(f"[{s.name}] stores made in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for label, (train_store, val_store) in stores.items():
        bits, per_level = bits_per_value(Path(train_store))
        rel, cka = fidelity(stores[LOSSLESS][1], Path(val_store))
        storage = fstore.FeatureStore(train_store).manifest.storage
        rows.append({"set": s.name, "form": label, "bits": bits, "x_bf16": BF16_BITS / bits, "rel_rmse": rel, "cka": cka,
                     "level_bits": {k: round(v, 2) for k, v in per_level.items()},
                     "forms": {k: storage.form(k) for k in per_level}})  # fmt: skip
    runs = root / "runs"
    b: dict[str, list[float]] = {LOSSLESS: [train(s, stores[LOSSLESS][0], stores[LOSSLESS][1], runs / f"{LOSSLESS}-0", 0, iters_scale)]}
    for row in rows:
        row["a"] = evaluate(s, runs / f"{LOSSLESS}-0", Path(stores[row["form"]][1])) if row["form"] != LOSSLESS else b[LOSSLESS][0]
        row["a_loss"] = rows[0]["a"] - row["a"]
    same = {r["form"]: next(q["form"] for q in rows if q["forms"] == r["forms"]) for r in rows}  # one (b) per set of forms
    for label in dict.fromkeys(same[f] for f in matter(rows)):
        for seed in range(len(b.get(label, [])), seeds):
            b.setdefault(label, []).append(train(s, Path(stores[label][0]), Path(stores[label][1]), runs / f"{label}-{seed}", seed,
                                                 iters_scale))  # fmt: skip
        print(f"[{s.name}] (b) {label}: {b[label]}", file=sys.stderr)
    for row in rows:
        got = b.get(same[row["form"]]) if row["form"] in matter(rows) else None
        row["b"] = statistics.mean(got) if got else None
        row["b_std"] = statistics.stdev(got) if got and len(got) > 1 else None
    base = rows[0]
    for row in rows:
        row["goal"] = meets_goal(s, row, base)
    print(f"[{s.name}] done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return rows


def matter(rows: list[dict[str, Any]]) -> list[str]:
    """The forms (b) is measured for: lossless, the most exact form within 2 bits per value (the goal's candidate) and
    the lowest-bit form (the curve's end)."""
    compact = [r for r in rows[1:] if r["bits"] <= GOAL_BITS]
    two = [min(compact, key=lambda r: (r["rel_rmse"], r["bits"]))["form"]] if compact else []
    lowest = min(rows[1:], key=lambda r: r["bits"], default=rows[0])["form"]
    return list(dict.fromkeys([rows[0]["form"], *two, lowest]))


def meets_goal(s: SetDef, row: dict[str, Any], base: dict[str, Any]) -> bool | None:
    """<= 2 bits, (a) within the set's allowance, (b) within one std of lossless; None where (b) was not measured."""
    if row["form"] == base["form"] or row["bits"] > GOAL_BITS:
        return False
    if row["a_loss"] > s.goal:
        return False
    if row["b"] is None or base["b"] is None:
        return None
    return base["b"] - row["b"] <= (base["b_std"] or 0.0)


def markdown(s: SetDef, rows: list[dict[str, Any]]) -> str:
    shown = []
    for r in rows:
        b = "-" if r["b"] is None else f"{r['b']:.3f}" + ("" if r["b_std"] is None else f" ± {r['b_std']:.3f}")
        levels = " / ".join(f"{v:.2f}" for v in r["level_bits"].values())
        forms = r["forms"].values()
        shown.append({"form": r["form"], "levels in": ", ".join(forms) if len(set(forms)) > 1 else next(iter(forms)),
                      "bits/value": f"{r['bits']:.2f}", "per level": levels, "x bf16 raw": f"{r['x_bf16']:.1f}",
                      "rel RMSE": f"{r['rel_rmse']:.3g}", "CKA": f"{r['cka']:.4f}", f"(a) {s.metric}": f"{r['a']:.3f}",
                      "(a) loss": f"{r['a_loss']:+.3f}", "(b) mean ± std": b,
                      "goal": {True: "yes", False: "no", None: "(a) only"}[r["goal"]]})  # fmt: skip
    return table(shown, list(shown[0]))


def demo_check(root: Path, flags: list[str]) -> dict[str, Any]:
    """`fcache demo`, then its val images extracted with the demo's flags plus ``flags``; the store's bits per value as
    `fcache info --json` gives them (each level's disk bytes over its values) and the demo RUN's box AP50 on it against
    the fp16 val store."""
    from fcache.apps.config import DemoConfig
    from fcache.apps.demo import extract_settings, run_demo
    from fcache.store.info import describe

    cfg = DemoConfig(out=str(root / "demo"))
    run_demo(cfg, say=lambda m: None)
    out, data = root / "demo" / "val-compact.zarr", root / "demo" / "data" / "val"
    args = ["extract", "--dataset", "coco", "--root", str(data / "images"), "--annotations", str(data / "annotations.json")]
    for k, v in extract_settings(cfg).items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, ",".join(v) if isinstance(v, tuple) else str(v)]
    subprocess.run([sys.executable, "-m", "fcache", *args, *flags, "--out", str(out), "--json"], check=True, stdout=subprocess.DEVNULL)
    levels = describe(out)["levels"]
    per_level = {lv["name"]: 8 * lv["disk_bytes"] / math.prod(lv["shape"]) for lv in levels}
    bits = 8 * sum(lv["disk_bytes"] for lv in levels) / sum(math.prod(lv["shape"]) for lv in levels)
    fp16 = evaluate(SETS["detection"], root / "demo" / "run", root / "demo" / "val.zarr")
    compact = evaluate(SETS["detection"], root / "demo" / "run", out)
    return {"flags": " ".join(flags), "bits": bits, "level_bits": {k: round(v, 2) for k, v in per_level.items()}, "fp16_ap50": fp16,
            "compact_ap50": compact, "ap50_loss": fp16 - compact,
            "pass": bits <= GOAL_BITS and fp16 - compact <= SETS["detection"].goal}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of: " + ", ".join(SETS))
    ap.add_argument("--seeds", type=int, default=3, help="(b): heads per form")
    ap.add_argument("--scale", type=float, default=1.0, help="samples of each set, times its size")
    ap.add_argument("--iters-scale", type=float, default=1.0, help="training iterations, times each set's")
    ap.add_argument("--demo", action="store_true", help="the demo check instead (section 4)")
    ap.add_argument("--demo-flags", default="--max-error 0.25", help="with --demo: extract flags of the compact val store")
    ap.add_argument(
        "--keep",
        default="",
        help="folder to keep the stores and runs in (default: a temporary one); "
        "rerun with the same folder and settings to reuse the stores and finished runs of an interrupted run",
    )
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="fcache-compact-"))
    t = time.perf_counter()
    if args.demo:
        d = demo_check(root, shlex.split(args.demo_flags))
        print(table([d], list(d)))
        print(f"results: {save('compact_demo', {'args': vars(args), 'seconds': time.perf_counter() - t, 'rows': [d]})}")
        return
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.sets.split(","):
        results[name] = measure_set(SETS[name], root / name, args.seeds, args.scale, args.iters_scale)
        print(f"\n### {name}: {SETS[name].metric}, {args.seeds} seed(s) for (b)\n\n{markdown(SETS[name], results[name])}\n", flush=True)
        path = save_results(args, results, time.perf_counter() - t)  # after each set, so a long run keeps what it measured
    print(f"results: {path} ({time.perf_counter() - t:.0f} s)")


def save_results(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], seconds: float) -> Path:
    rows = [{k: r[k] for k in ("set", "form", "bits", "x_bf16", "rel_rmse", "cka", "a", "a_loss", "b", "b_std", "goal")}
            for rs in results.values() for r in rs]  # fmt: skip
    payload = {"args": vars(args), "seconds": round(seconds), "threads": torch.get_num_threads(), "sets": results, "rows": rows}
    return save("compact", payload)


if __name__ == "__main__":
    main()
