"""`make bench`: every benchmark at CPU-friendly sizes, then one Markdown summary of the figures.

Each script runs in its own process and writes benchmarks/results/<name>.json; the summary
(benchmarks/results/SUMMARY.md) puts their tables side by side. ``--gpu`` runs the paper-size
profile instead (`make bench-gpu`, see gpu_profile.py).
Usage: python benchmarks/run_all.py [--only store_io,extract] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import RESULTS, table  # noqa: E402

# script -> CPU-friendly arguments (the whole set runs in about 15 minutes on 2 cores)
SCRIPTS = {
    "store_io": ["--samples", "8", "--size", "512"],
    "extract": ["--sizes", "256:0,512:1", "--images", "32", "--repeats", "2"],  # sdpa and timm attention, interleaved
    "heads": ["--configs", "swinv2-t@256:4,swinv2-b@512:2", "--heads", "fpn:rois=128;bifpn:layers=5,rois=128", "--iters", "3"],
    "seg_heads": [],
    "video_heads": [],
    "distribution": ["--images", "64"],
    "heads_per_pass": ["--sizes", "256", "--rounds", "2"],
    "read_speed": ["--samples-a", "64", "--samples-b", "8", "--forms", "int4,int3,pca8"],
    "handover": ["--shapes", "A,B", "--samples", "16"],
    "scale": ["--n", "2000"],  # full COCO-train size: python benchmarks/scale.py --n 10000,40000,118287 (docs/performance.md, "Scale")
    "compact": ["--seeds", "2", "--scale", "0.5", "--iters-scale", "0.25"],  # in full: python benchmarks/compact.py
}
QUICK = {
    "extract": ["--sizes", "256:0", "--images", "8", "--repeats", "1", "--seconds", "1"],
    "heads": ["--configs", "swinv2-t@256:2", "--heads", "fpn:rois=128", "--iters", "1"],
    "heads_per_pass": ["--sizes", "256", "--iters", "4", "--rounds", "1"],
    "distribution": ["--images", "16"],
    "read_speed": ["--samples-a", "32", "--samples-b", "8", "--rounds", "1", "--forms", "int4"],
    "handover": ["--shapes", "A", "--samples", "16", "--passes", "1"],
    "scale": ["--n", "500", "--steps", "json_load,validate,create,commit,open,info,verify_fast,to_dask"],
    "compact": ["--sets", "video", "--seeds", "1", "--scale", "0.25", "--iters-scale", "0.1"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(SCRIPTS))
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else SCRIPTS) if (HERE / f"{n}.py").exists()]
    ran = {}
    for name in names:
        extra = QUICK.get(name, SCRIPTS[name]) if args.quick else SCRIPTS[name]
        t = time.perf_counter()
        print(f"== {name} {' '.join(extra)}", flush=True)
        r = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra])
        ran[name] = {"exit_code": r.returncode, "seconds": round(time.perf_counter() - t, 1)}
    write_summary(ran)


def write_summary(ran: dict[str, dict]) -> None:
    lines = ["# fcache benchmark figures", "", "Ratios are measured within one run on one machine; see each script's docstring.", ""]
    for name, info in ran.items():
        path = RESULTS / f"{name}.json"
        lines.append(f"## {name} ({info['seconds']:.0f} s, exit code {info['exit_code']})")
        lines.append("")
        if info["exit_code"] == 0 and path.exists():
            result = json.loads(path.read_text())
            rows = result.get("rows", [])
            if rows:
                lines.append(table(rows, list(rows[0])))
            lines.append("")
            argv = " ".join(map(str, result.get("argv", [])))
            lines.append(f"`python benchmarks/{name}.py {argv}` on {result.get('machine', '?')}, {result.get('time', '')}")
        else:
            lines.append("failed: see the output above")
        lines.append("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines))
    print(f"summary: {RESULTS / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
