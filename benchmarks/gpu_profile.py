"""`make bench-gpu`: the performance figures at the paper's sizes, on one CUDA GPU.

1. memory: bifpn:layers=5 trained from a store of SwinV2-G-shaped features at 1024, batch 8
   (the paper's frozen-online figure is 31 GB; goal <= 16 GB), plus its step time;
2. Tables 7/8: for detection, segmentation and video, SwinV2-T/B/L with the paper's heads, batch sizes and inputs
   (``fcache.apps.bench.PAPER``): head from the store vs frozen backbone online vs full finetune (time per iteration,
   peak memory, trainable parameters; the paper's frozen / full-finetune figures beside ours), and SwinV2-G from
   the store only (its features' shapes, no weights). A setting that runs out of memory is an error row;
3. extraction: swinv2-l at 1024 per attention (fcache's SDPA, timm's own; ``--extract-variants`` adds e.g.
   ``sdpa+compile``), alternating, twice: pipeline images/s over bare forward images/s (goal >= 0.90), the speed-ups
   over timm's attention, the bare forward's peak memory and first forward (compilation) time.
Usage: python benchmarks/gpu_profile.py [--out DIR] [--skip memory,tables,extract] [--tasks ...] [--models ...]
       [--extract-variants sdpa,timm] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.apps.bench import PAPER, BenchConfig, run_bench  # noqa: E402

SIZE, DEVICE = 1024, "cuda"  # --smoke: 128 on the CPU, to check the script itself
SKIP: set[str] = set()
SMOKE = False
TASKS, MODELS = tuple(PAPER), ("swinv2-t", "swinv2-b", "swinv2-l")
VARIANTS = ["sdpa", "timm"]  # the extraction part's (benchmarks/extract.py's variants); speed-ups are over "timm"
# Tables 7 and 8 (memory GB, s/iter): (frozen, full finetune) per task and backbone; None where the paper has none (>80G)
PAPER_FIGURES: dict[tuple[str, str], tuple[tuple[float, float | None], tuple[float, float | None]]] = {
    ("detection", "swinv2-t"): ((9.74, 9.78), (0.44, 0.46)),
    ("detection", "swinv2-b"): ((10.38, 17.29), (0.50, 0.65)),
    ("detection", "swinv2-l"): ((10.56, 25.81), (0.57, 0.84)),
    ("detection", "swinv2-g"): ((31.05, None), (1.20, None)),
    ("segmentation", "swinv2-t"): ((4.24, 5.04), (0.28, 0.34)),
    ("segmentation", "swinv2-b"): ((4.42, 7.84), (0.31, 0.41)),
    ("segmentation", "swinv2-l"): ((4.84, 11.77), (0.34, 0.48)),
    ("segmentation", "swinv2-g"): ((23.84, 78.77), (1.23, 3.08)),
    ("video", "swinv2-t"): ((10.43, 15.87), (0.31, 0.51)),
    ("video", "swinv2-b"): ((13.46, 31.47), (0.52, 0.96)),
    ("video", "swinv2-l"): ((12.80, 27.05), (0.45, 0.78)),
    ("video", "swinv2-g"): ((30.54, None), (1.14, None)),
}
COLUMNS = ["task", "model", "input_size", "batch", "setting", "head", "s_per_iter", "peak_mem_gb", "trainable_params",
           "paper_s_per_iter", "paper_mem_gb", "error"]  # fmt: skip


def memory() -> list[dict]:
    rows = []
    heads = ("bifpn:layers=5,checkpoint=1",) + (() if "memory-plain" in SKIP else ("bifpn:layers=5",))
    for head in heads:
        cfg = BenchConfig(model="swinv2-g", input_size=SIZE, batch_size=1 if SMOKE else 8, head=head, iters=1 if SMOKE else 3,
                          device=DEVICE, features_only=True, num_workers=8)  # fmt: skip
        rows += run_bench(cfg)
    return rows


def tables() -> list[dict]:
    """Every task: T/B/L in the three settings at the paper's sizes, then G from the store."""
    rows = []
    for task in TASKS:
        for model in (*MODELS, "swinv2-g"):
            giant = model == "swinv2-g"
            sizes = {"iters": 3, "num_workers": 8} | _smoke_sizes(task)
            cfg = BenchConfig(task=task, model=model, device=DEVICE, features_only=giant, **sizes)
            print(f"  {task} {model} (batch {cfg.batch_size} @ {cfg.input_size})", flush=True)
            rows += [_with_paper(r) for r in run_bench(cfg)]
    return rows


def _smoke_sizes(task: str) -> dict[str, Any]:
    """--smoke: tiny inputs, one sample or clip of 2 frames, one timed iteration (checks the script, measures nothing)."""
    if not SMOKE:
        return {}
    smoke = {"input_size": 64 if task == "video" else SIZE, "batch_size": 1, "iters": 1, "num_workers": 1}
    return smoke | ({"frames": 2} if task == "video" else {})


def _with_paper(row: dict[str, Any]) -> dict[str, Any]:
    """The paper's figure for the same task, backbone and setting: its frozen one for `online`, full finetune for `finetune`."""
    figures = PAPER_FIGURES.get((row["task"], row["model"]))
    column = {"online": 0, "finetune": 1}.get(row["setting"])
    if figures is None or column is None:
        return row
    (mem, sec) = figures
    return row | {"paper_mem_gb": mem[column] if mem[column] is not None else ">80", "paper_s_per_iter": sec[column] or "-"}


def extract() -> list[dict]:
    """SwinV2-L at SIZE, batch 8 (bf16 autocast on CUDA), per attention: bare forward, pipeline, their ratio, the
    speed-up over timm's attention, and the peak memory of the bare forward; the attentions alternate, twice."""
    import tempfile

    from common import photo_folder
    from extract import build, pipeline, timed_forwards

    tmp = Path(tempfile.mkdtemp(prefix="fcache-gpu-"))
    photo_folder(tmp / "images", 48, size=(SIZE, SIZE * 3 // 4))
    x = torch.randn(8, 3, SIZE, SIZE)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(1 if SMOKE else 2):
        for variant in VARIANTS:
            bb = build("swinv2-l", SIZE, DEVICE, variant)
            t = time.perf_counter()
            bb.forward(x)  # warm-up (and compilation)
            first = time.perf_counter() - t
            _reset_peak()
            bare = timed_forwards(bb, x, seconds=2 if SMOKE else 10)
            peak = _peak_gb()
            pipe = pipeline("swinv2-l", SIZE, 8, 8, DEVICE, tmp / "images", tmp / "s.zarr", backbone=bb)
            runs[variant].append({"bare_img_s": bare, "pipeline_img_s": pipe["images_per_s"], "forward_peak_gb": peak,
                                  "first_forward_s": first} | pipe)  # fmt: skip
            del bb
    rows = []
    for variant, measured in runs.items():
        med = {k: statistics.median(m[k] for m in measured) for k in measured[0] if k != "images_per_s"}
        row = {"model": "swinv2-l", "size": SIZE, "batch": 8, "variant": variant, **med}
        rows.append(row | {"ratio": med["pipeline_img_s"] / med["bare_img_s"]})
    base = next((r for r in rows if r["variant"] == "timm"), None)
    for row in rows if base else ():
        row["pipeline_vs_timm"] = row["pipeline_img_s"] / base["pipeline_img_s"]
        row["bare_vs_timm"] = row["bare_img_s"] / base["bare_img_s"]
    return rows


def _reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def main() -> None:
    global SIZE, DEVICE, SMOKE, TASKS, MODELS, VARIANTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--skip", default="", help="parts to skip: memory, tables, extract, or memory-plain (the un-checkpointed row)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="tasks of the tables part")
    ap.add_argument("--models", default=",".join(MODELS), help="backbones measured in all three settings (swinv2-g always from the store)")
    ap.add_argument("--extract-variants", default=",".join(VARIANTS), help="extraction part: ATTENTION[+compile],... (e.g. sdpa+compile)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, swinv2-t only: checks the script, measures nothing")
    args = ap.parse_args()
    SKIP.update(args.skip.split(","))
    TASKS, MODELS = tuple(args.tasks.split(",")), tuple(args.models.split(","))
    VARIANTS = args.extract_variants.split(",")
    if args.smoke:
        SIZE, DEVICE, SMOKE, MODELS = 128, "cpu", True, ("swinv2-t",)
    elif not torch.cuda.is_available():
        sys.exit("bench-gpu needs a CUDA device; `make bench` gives the CPU figures")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {device}", flush=True)
    results = {}
    for name, fn in (("memory", memory), ("tables", tables), ("extract", extract)):
        if name in args.skip.split(","):
            continue
        t = time.perf_counter()
        try:
            rows = fn()
            cols = COLUMNS if name == "tables" else list(dict.fromkeys(k for r in rows for k in r))
            print(f"\n== {name} ({time.perf_counter() - t:.0f} s)\n{table(rows, cols)}", flush=True)
            results[name] = rows
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            traceback.print_exc()
            results[name] = [{"error": traceback.format_exc().splitlines()[-1]}]
    path = save("gpu_profile" if DEVICE == "cuda" else "gpu_profile_smoke", {"device": device, "results": results})
    if args.out:
        Path(args.out, "gpu_profile.json").write_text(json.dumps(json.loads(path.read_text()), indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
