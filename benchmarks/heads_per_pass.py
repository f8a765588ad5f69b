"""Several heads in one read pass of the store against one run per head (design: "Distribution", head training).

A store is extracted by a random-init backbone over the demo's photos; then, on one machine in one run, each head
trains alone for --iters iterations (its own run: store opened, batches read and collated, steps), and all heads
train for the same iterations in one pass (batches read and collated once, every head steps on each). Both include
what a user waits for (preparing the heads, reading, stepping, checkpointing), not evaluation. The ratio is the sum
of the separate runs' wall times over the pass's; its ceiling is (read + steps of all heads) / (read + steps) when
reading is free, and the number of heads when the heads are free. The weights must come out identical either way.
Usage: python benchmarks/heads_per_pass.py [--model swinv2-t] [--sizes 256,512] [--images 16] [--iters 8] [--batch 2]
       [--heads "fpn;bifpn:layers=3"] [--num-workers 0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.apps.demo import build_dataset  # noqa: E402
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract  # noqa: E402
from fcache.train_heads.config import TrainConfig  # noqa: E402
from fcache.train_heads.data import train_loader  # noqa: E402
from fcache.train_heads.training import (  # noqa: E402
    prepare_training,
    run_train,
    run_train_heads,  # noqa: E402
    training_data,
)

SMALL = "channels=64,rois=64,rpn_batch=64"
HEADS = f"fpn:{SMALL};bifpn:layers=1,{SMALL};bifpn:layers=3,{SMALL}"


def config(store: Path, out: Path, head: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(store=str(store), out=str(out), head=head, iters=args.iters, batch_size=args.batch, warmup=1,
                       num_workers=args.num_workers, device="cpu", checkpoint_every=args.iters, log_every=args.iters)  # fmt: skip


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_only(cfg: TrainConfig, heads: list[str]) -> float:
    """Seconds to read and collate the pass's batches (the union of the heads' levels) without any head step."""
    prepared = [prepare_training(TrainConfig(**{**cfg.to_dict(), "head": h})) for h in heads]
    levels = sorted({lv for p in prepared for lv in p.levels}, key=lambda lv: lv.stride)
    data = training_data(prepared[0], cfg.seed, [lv.name for lv in levels])
    loader = train_loader(data, prepared[0].task, batch_size=cfg.batch_size, seed=cfg.seed, start=0, stop=cfg.iters,
                          num_workers=cfg.num_workers)  # fmt: skip
    return timed(lambda: sum(1 for _ in loader))


def measure(store: Path, work: Path, heads: list[str], args: argparse.Namespace) -> list[dict]:
    """Rows of seconds: each head alone, their sum, the one pass (with the ratio), reading alone; the minimum over
    --rounds interleaved rounds (the CPU may be shared: the minimum is the least disturbed measurement)."""
    quiet = lambda m: None  # noqa: E731
    once = argparse.Namespace(**{**vars(args), "iters": 1})  # first steps pay one-time costs (allocator, kernels): not timed
    run_train_heads([config(store, work / "warm-up", h, once) for h in heads], progress=False, say=quiet)
    alone: list[list[float]] = [[] for _ in heads]
    together: list[float] = []
    runs: list[tuple[Path, Path]] = []  # (alone, in the pass) RUN folders of round 0
    for r in range(args.rounds):
        cfgs = [config(store, work / f"pass{r}", h, args) for h in heads]
        t = time.perf_counter()
        summaries = run_train_heads(cfgs, progress=False, say=quiet)
        together.append(time.perf_counter() - t)
        for k, head in enumerate(heads):
            out = work / f"alone{r}-{k}"
            alone[k].append(timed(lambda h=head, o=out: run_train(config(store, o, h, args), progress=False, say=quiet)))
            runs += [(out, Path(summaries[k]["run"]))] if r == 0 else []
    separate, one_pass = sum(min(t) for t in alone), min(together)
    rows = [{"setting": f"alone: {h}", "seconds": min(t)} for h, t in zip(heads, alone, strict=True)]
    rows.append({"setting": f"{len(heads)} separate runs", "seconds": separate})
    same = all(_equal(a / "model.safetensors", b / "model.safetensors") for a, b in runs)
    rows.append({"setting": f"one pass, {len(heads)} heads", "seconds": one_pass, "ratio": separate / one_pass, "identical_weights": same})
    reads = read_only(config(store, work / "unused", heads[0], args), heads)
    rows.append({"setting": f"reading alone ({args.iters} batches, all levels)", "seconds": reads})
    return rows


def _equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinv2-t")
    ap.add_argument("--sizes", default="256", help="input sizes, one store each, e.g. 256,512")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: reading is counted in the wall time)")
    ap.add_argument("--heads", default=HEADS, help="head specs separated by ';'")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the minimum of each setting is kept")
    args = ap.parse_args()
    heads = args.heads.split(";")
    tmp = Path(tempfile.mkdtemp(prefix="fcache-pass-"))
    rows = []
    try:
        for size in map(int, args.sizes.split(",")):
            images, ann = build_dataset(tmp / f"data{size}", args.images, seed=0, long_side=size)
            store = tmp / f"store{size}.zarr"
            run_extract(ExtractConfig.from_flags(dataset="coco", root=str(images), annotations=str(ann), out=str(store), model=args.model,
                                      random_init=True, input_size=size, num_workers=1, device="cpu", shard_size=4))  # fmt: skip
            rows += [{"store": f"{args.model}@{size}", **r} for r in measure(store, tmp / f"work{size}", heads, args)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(heads)} detection heads, batch {args.batch}, {args.iters} iterations, CPU, {torch.get_num_threads()} threads, "
          f"{args.num_workers} loader workers: ratio = separate runs / one pass")  # fmt: skip
    print(table(rows, ["store", "setting", "seconds", "ratio", "identical_weights"]))
    print(f"results: {save('heads_per_pass', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
