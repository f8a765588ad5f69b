"""Distributed extraction: images/s of `fcache extract --cluster local:N` over the in-process run (same model, size, batch).

Both runs are whole `run_extract` calls on the same real photos. `pipeline img/s` counts from the first sample to the
last commit (in process: the overlapped pipeline; cluster: from task submission to the last result, so it includes
each worker building its backbone and starting its decode processes); `end-to-end img/s` divides by the whole call
(start-up, store creation, cluster start and shutdown included). The in-process run is measured before and after the
cluster run and averaged.
Usage: python benchmarks/distribution.py [--model swinv2-t] [--size 256] [--images 32] [--batch-size 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import photo_folder, save, table  # noqa: E402
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract  # noqa: E402


def measure(args: argparse.Namespace, root: Path, out: Path, cluster: str) -> dict[str, float]:
    cfg = ExtractConfig.from_flags(
        dataset="folder",
        root=str(root),
        out=str(out),
        model=args.model,
        random_init=True,
        input_size=args.size,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        device="cpu",
        overwrite=True,
        cluster=cluster,
    )
    s = run_extract(cfg)
    assert s.exit_code == 0, s.status_counts
    return {"wall_s": s.seconds, "pipeline_img_s": s.images_per_s, "end_to_end_img_s": s.processed / s.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinv2-t")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers in process; decode processes per dask worker")
    ap.add_argument("--workers", type=int, default=2, help="N of --cluster local:N")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fcache-bench-"))
    photo_folder(tmp / "images", args.images)
    try:
        before = measure(args, tmp / "images", tmp / "a.zarr", "")
        cluster = measure(args, tmp / "images", tmp / "b.zarr", f"local:{args.workers}")
        after = measure(args, tmp / "images", tmp / "a.zarr", "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    inproc = {k: (before[k] + after[k]) / 2 for k in before}
    common = {"model": args.model, "size": args.size, "batch": args.batch_size, "images": args.images}
    rows = [
        {**common, "run": "in-process", **inproc, "pipeline_ratio": 1.0, "end_to_end_ratio": 1.0},
        {
            **common,
            "run": f"--cluster local:{args.workers}",
            **cluster,
            "pipeline_ratio": cluster["pipeline_img_s"] / inproc["pipeline_img_s"],
            "end_to_end_ratio": cluster["end_to_end_img_s"] / inproc["end_to_end_img_s"],
        },
    ]
    print(f"distributed extraction vs in process ({args.images} real photos, CPU)")
    print(table(rows, list(rows[0])))
    print(f"results: {save('distribution', {'args': vars(args), 'rows': rows, 'in_process_runs': [before, after]})}")


if __name__ == "__main__":
    main()
