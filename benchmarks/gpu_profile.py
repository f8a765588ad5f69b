"""`make bench-gpu`: the performance figures at the paper's sizes, on one CUDA GPU, in under 10 minutes.

1. memory: bifpn:layers=5 trained from a store of SwinV2-G-shaped features at 1024, batch 8
   (the paper's frozen-online figure is 31 GB; goal <= 16 GB), plus its step time;
2. Tables 7/8 analogue: swinv2-l at 1024, head from the store vs frozen backbone online vs full finetune
   (time per iteration, peak memory; the head speed-up is online / store);
3. extraction overhead: swinv2-l at 1024, pipeline images/s over bare forward images/s (goal >= 0.90).
Usage: python benchmarks/gpu_profile.py [--out DIR] [--skip memory,tables,extract]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.apps.bench import BenchConfig, run_bench  # noqa: E402

SIZE, DEVICE = 1024, "cuda"  # --smoke: 128 on the CPU, to check the script itself
SKIP: set[str] = set()


def memory() -> list[dict]:
    rows = []
    heads = ("bifpn:layers=5,checkpoint=1",) + (() if "memory-plain" in SKIP else ("bifpn:layers=5",))
    for head in heads:
        cfg = BenchConfig(model="swinv2-g", input_size=SIZE, batch_size=8, head=head, steps=3, device=DEVICE,
                          features_only=True, num_workers=8)  # fmt: skip
        rows += run_bench(cfg)
    return rows


def tables() -> list[dict]:
    cfg = BenchConfig(model="swinv2-l", input_size=SIZE, batch_size=4, head="bifpn:layers=5", steps=3, device=DEVICE, num_workers=8)
    rows = run_bench(cfg)
    store = next(r for r in rows if r["setting"] == "store")
    for r in rows:
        if "s_per_iter" in r and "s_per_iter" in store:
            r["vs_store"] = r["s_per_iter"] / store["s_per_iter"]
    return rows


def extract() -> list[dict]:
    import tempfile

    from common import photo_folder
    from extract import bare_images_per_s, pipeline

    tmp = Path(tempfile.mkdtemp(prefix="fcache-gpu-"))
    photo_folder(tmp / "images", 48, size=(SIZE, SIZE * 3 // 4))
    bare = bare_images_per_s("swinv2-l", SIZE, 8, DEVICE, seconds=10)
    pipe = pipeline("swinv2-l", SIZE, 8, 8, DEVICE, tmp / "images", tmp / "s.zarr")
    timing = {k: v for k, v in pipe.items() if k.endswith("_s") and k != "images_per_s"}
    row = {"model": "swinv2-l", "size": SIZE, "batch": 8, "bare_img_s": bare, "pipeline_img_s": pipe["images_per_s"]}
    return [{**row, "ratio": pipe["images_per_s"] / bare, **timing}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--skip", default="", help="parts to skip: memory, tables, extract, or memory-plain (the un-checkpointed row)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    global SIZE, DEVICE
    SKIP.update(args.skip.split(","))
    if args.smoke:
        SIZE, DEVICE = 128, "cpu"
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
            print(f"\n== {name} ({time.perf_counter() - t:.0f} s)\n{table(rows, list(rows[0]))}", flush=True)
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
