"""What a batch of stored values costs on its way from the store to the training step: read in the training process, or
read by DataLoader workers and handed over in shared memory.

The training loader's Dataset (``FeatureDataset(stored=True)``, collated by ``fcache.store.transit.stack``) at the
chunk shapes of ``read_speed.py`` (A: demo size, B: SwinV2-L@1024), random batches, and the step's first operation
(each level decoded to float32 into reused ``transit.Buffers``). Per batch: CPU milliseconds and minor page faults of
the reading (in the training process without workers, in a worker with them) and of the training process (receiving
and decoding, torch's own threads included), and the batches per second. Fresh pages cost a fault and a zeroed page
each; the training process reads its own batches into arrays it reuses (``transit.Recycled``), a worker into fresh
shared memory.

Usage: python benchmarks/handover.py [--shapes B] [--samples 16] [--batch 2] [--workers 0,2] [--passes 2]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from read_speed import build  # noqa: E402

from common import save, table  # noqa: E402
from fcache import store as fstore  # noqa: E402
from fcache.store.transit import Buffers, decode, stack  # noqa: E402


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


class Reads(torch.utils.data.Dataset):
    """The store's stored-values Dataset, each batch with the CPU seconds and faults its reading and collation took."""

    def __init__(self, path: Path) -> None:
        self.ds = fstore.open(path).dataset(stored=True)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, js: list[int]) -> tuple[list[dict[str, Any]], tuple[float, int]]:
        before = _usage()
        return self.ds.__getitems__(js), before

    def collate(self, got: tuple[list[dict[str, Any]], tuple[float, int]]) -> tuple[dict[str, Any], float, int]:
        items, (cpu, faults) = got
        batch = {lv: stack([it["features"][lv] for it in items]) for lv in self.ds.levels}
        now = _usage()
        return batch, now[0] - cpu, now[1] - faults


def measure(path: Path, workers: int, batch: int, passes: int) -> dict[str, float]:
    reads = Reads(path)
    order = [int(j) for j in np.random.default_rng(1).permutation(len(reads))]
    batches = [order[k : k + batch] for k in range(0, len(order) - batch + 1, batch)] * passes
    loader = torch.utils.data.DataLoader(
        reads, batch_sampler=batches, collate_fn=reads.collate, num_workers=workers, prefetch_factor=2 if workers else None
    )
    buffers, got = Buffers(), iter(loader)
    first, _, _ = next(got)  # workers started, buffers made
    for lv, s in first.items():
        decode(s, lv, buffers)
    del first
    read_cpu, read_faults, n = 0.0, 0, 0
    (cpu, faults), t = _usage(), time.perf_counter()
    for values, c, f in got:
        for lv, s in values.items():
            decode(s, lv, buffers)
        read_cpu, read_faults, n = read_cpu + c, read_faults + f, n + 1
        del values
    dt = time.perf_counter() - t
    main_cpu, main_faults = _usage()[0] - cpu, _usage()[1] - faults
    if not workers:  # the reading happened in this process: the rest is receiving and decoding
        main_cpu, main_faults = main_cpu - read_cpu, main_faults - read_faults
    return {"workers": workers, "batches_s": n / dt, "read_cpu_ms": 1e3 * read_cpu / n, "read_faults": read_faults / n,
            "main_cpu_ms": 1e3 * main_cpu / n, "main_faults": main_faults / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="B")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--passes", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fcache-handover-"))
    rows = []
    try:
        for name in args.shapes.split(","):
            path, _ = build(root, name, args.samples)
            for w in [int(x) for x in args.workers.split(",")]:
                rows.append({"shape": name, **measure(path, w, args.batch, args.passes)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"per batch of {args.batch}: reading (in a worker with workers) and the training process receiving + decoding")
    print(table(rows, ["shape", "workers", "batches_s", "read_cpu_ms", "read_faults", "main_cpu_ms", "main_faults"]))
    print(f"results: {save('handover', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
