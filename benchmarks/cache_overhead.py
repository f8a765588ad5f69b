"""Cache overhead: a detection head's training step from the store against the same step on batches already in memory.

A synthetic store of a backbone's exact level shapes (``fcache bench``'s: random features, synthetic boxes and masks)
is trained from by one head in interleaved rounds; every variant starts from the same weights, optimiser state and RNG
seed and steps on the same batches, so they run the same computation (the losses are checked equal) and differ only in
where the features come from:
  - ``store``: the training loader (``train_loader``, DataLoader workers reading ahead as training reads), the batch
    moved to the device (``Batch.to``), then the step: what ``fcache train-head`` does;
  - ``store0``: the same without worker processes (read in the training process);
  - ``float32``: the loader as it was before stored values travelled: the Dataset's float32 tensors, collated in the
    workers' shared memory;
  - ``memory``: the same batches read beforehand, float32 in the process's private memory;
  - ``shm``: those float32 batches in shared memory, as DataLoader workers deliver float32 tensors.
First, per batch in the benchmark's process (``--rounds 0``: only this): reading it as float32 or as stored values,
and decoding the stored batch into reused buffers (``Batch.to``: the part of the loading that stays in the step).
Each round times ``--steps`` steps per variant after one warm-up step; the ratio to ``memory`` is taken per round and
reported as the median and the range over the rounds (the machine is shared: interleaving keeps its load the same for
all variants). Goal: ``store`` / ``memory`` <= 1.10.

Usage: python benchmarks/cache_overhead.py [--model swinv2-b] [--size 512] [--batch 2] [--head bifpn:layers=5,rois=128]
       [--rounds 5] [--steps 2] [--num-workers 2] [--dtype fp16] [--variants store,store0,float32,memory,shm]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.apps.bench_stores import synthetic_store  # noqa: E402
from fcache.extract.backbones import build_backbone  # noqa: E402
from fcache.store.transit import Buffers  # noqa: E402
from fcache.train_heads.config import TrainConfig  # noqa: E402
from fcache.train_heads.data import train_loader  # noqa: E402
from fcache.train_heads.defaults import with_defaults  # noqa: E402
from fcache.train_heads.loop import make_optimizer, train_step  # noqa: E402
from fcache.train_heads.training import prepare_training, training_data  # noqa: E402

DEVICE = torch.device("cpu")


def private(batch: Any) -> Any:
    """The batch on the device with its features float32 in fresh private memory."""
    b = batch.to(DEVICE)
    return dataclasses.replace(b, features={lv: x.clone() for lv, x in b.features.items()})


def shared(batch: Any) -> Any:
    b = private(batch)
    return dataclasses.replace(b, features={lv: x.share_memory_() for lv, x in b.features.items()})


class Bench:
    """One head on one store, reset to the same state before every variant's run."""

    def __init__(self, store: Path, head: str, batch: int, workers: int) -> None:
        self.cfg = with_defaults(TrainConfig(store=str(store), out="", head=head, iters=10_000, batch_size=batch, num_workers=workers,
                                             device="cpu", warmup=0))  # fmt: skip
        self.p = prepare_training(self.cfg)
        self.p.model.train()
        self.opt = make_optimizer(self.p.model, self.cfg)
        self.start = copy.deepcopy((self.p.model.state_dict(), self.opt.state_dict()))
        self.data = training_data(self.p, self.cfg.seed)

    def loader(self, workers: int, stored: bool = True) -> Iterable[Any]:
        data = copy.copy(self.data)  # the same samples and views, read as stored values or as float32
        data.stored = stored
        return train_loader(data, self.p.task, batch_size=self.cfg.batch_size, seed=self.cfg.seed, start=0, stop=10_000,
                            num_workers=workers, device=DEVICE)  # fmt: skip

    def run(self, batches: Iterable[Any], steps: int) -> tuple[float, list[float]]:
        """Seconds per step (fetching the batch, ``Batch.to``, the step) over ``steps`` steps after a warm-up; the losses."""
        self.p.model.load_state_dict(self.start[0])
        self.opt.load_state_dict(copy.deepcopy(self.start[1]))
        torch.manual_seed(self.cfg.seed)
        it, losses, buffers = iter(batches), [], Buffers()
        for k in range(steps + 1):
            if k == 1:
                t = time.perf_counter()
            batch = next(it).to(DEVICE, buffers)  # as train_pass: stored values decoded into reused float32 buffers
            losses.append(train_step(self.p.model, self.opt, self.p.task, batch, self.cfg, DEVICE, k)["loss"])
        seconds = (time.perf_counter() - t) / steps
        del it
        return seconds, losses


def variants(bench: Bench, steps: int, workers: int) -> dict[str, Callable[[], Iterable[Any]]]:
    first = [b for _, b in zip(range(steps + 1), bench.loader(0), strict=False)]
    in_memory = [private(b) for b in first]
    in_shm = [shared(b) for b in first]
    return {
        "store": lambda: bench.loader(workers),
        "store0": lambda: bench.loader(0),
        "float32": lambda: bench.loader(workers, stored=False),
        "memory": lambda: in_memory,
        "shm": lambda: in_shm,
    }


def loader_costs(bench: Bench, repeats: int = 5) -> dict[str, float]:
    """Median seconds per batch, in this process: a batch read as float32 or as stored values (what workers do ahead of
    the step), and the stored batch's decoding into reused float32 buffers (``Batch.to``: what stays in the step)."""

    def median_of(run: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    stored, as_float, buffers = iter(bench.loader(0)), iter(bench.loader(0, stored=False)), Buffers()
    batch = next(stored)
    return {
        "read_float32_s": median_of(lambda: next(as_float)),
        "read_stored_s": median_of(lambda: next(stored)),
        "decode_s": median_of(lambda: batch.to(DEVICE, buffers)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinv2-b")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--head", default="bifpn:layers=5,rois=128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant and round, after one warm-up step")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--variants", default="store,store0,float32,memory,shm")
    args = ap.parse_args()
    names = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="fcache-cache-overhead-"))
    load = [os.getloadavg()[0]]
    try:
        bb = build_backbone(args.model, input_size=args.size, meta=True)
        store = synthetic_store(tmp / "bench.zarr", "detection", bb.info, samples=4 * args.batch, shard_size=args.batch,
                                dtype=args.dtype, frames=0, seed=0)  # fmt: skip
        bench = Bench(store, args.head, args.batch, args.num_workers)
        costs = loader_costs(bench)
        print("per batch in one process: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in costs.items()), file=sys.stderr)
        if not args.rounds:
            return
        make = variants(bench, args.steps, args.num_workers)
        times: dict[str, list[float]] = {n: [] for n in names}
        reference: list[float] | None = None
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:  # a different variant first each round
                seconds, losses = bench.run(make[n](), args.steps)
                if reference is None:
                    reference = losses
                assert losses == reference, f"{n} trained on other values: {losses} != {reference}"
                times[n].append(seconds)
                print(f"round {r} {n}: {seconds:.3f} s/step", file=sys.stderr)
            load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for n in names:
        ratios = [t / m for t, m in zip(times[n], times["memory"], strict=True)] if "memory" in times else []
        rows.append({"variant": n, "s_per_step_median": statistics.median(times[n]), "s_min": min(times[n]), "s_max": max(times[n]),
                     "ratio_vs_memory_median": statistics.median(ratios) if ratios else "", "ratio_min": min(ratios, default=""),
                     "ratio_max": max(ratios, default="")})  # fmt: skip
    print(f"cache overhead, {args.head} on {args.model}@{args.size} batch {args.batch}, {args.dtype} store, {os.cpu_count()} cores, "
          f"{args.rounds} rounds x {args.steps} steps, load average {min(load):.1f}-{max(load):.1f} "
          "(goal: store / memory <= 1.10)")  # fmt: skip
    print(table(rows, list(rows[0])))
    print(f"results: {save('cache_overhead', {'args': vars(args), 'rows': rows, 'times': times, 'load': load})}")


if __name__ == "__main__":
    main()
