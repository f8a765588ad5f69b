"""Head speed-up, cache overhead and loader headroom for detection heads (design: performance figures 2, 2b, 3).

For each backbone@size and head, on one machine in one run:
  - from-cache step: the training DataLoader reads the store (workers) + the head's training step;
  - in-memory step: the same head step on batches already in memory;
  - online-frozen step: the frozen backbone's forward on the batch's images + the same head step;
  - reader: samples/s of the store DataLoader alone (features + targets, collated).
The three step settings start from the same weights, optimiser state and RNG seed and see the same batches, so
they run the same computation and differ only in where the features come from.
Ratios: speed-up = online / from-cache (ceiling (backbone + head) / head), cache overhead =
from-cache / in-memory (goal <= 1.10), loader headroom = reader samples/s / head samples/s (goal >= 3).
Usage: python benchmarks/heads.py [--configs swinv2-t@256:4,swinv2-b@512:2] [--heads fpn,bifpn:layers=5] [--iters 3]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.apps.demo import build_dataset  # noqa: E402
from fcache.extract.backbones import build_backbone  # noqa: E402
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract  # noqa: E402
from fcache.extract.stages import SampleDataset  # noqa: E402
from fcache.train_heads.config import TrainConfig  # noqa: E402
from fcache.train_heads.data import train_loader  # noqa: E402
from fcache.train_heads.defaults import with_defaults  # noqa: E402
from fcache.train_heads.loop import make_optimizer, train_step  # noqa: E402
from fcache.train_heads.training import prepare_training, training_data  # noqa: E402


def timed_steps(model, opt, task, batches, cfg, device, steps: int, before=None) -> float:  # noqa: ANN001
    """Seconds per training step over ``steps`` steps after one warm-up step; ``before(batch)`` runs first (online)."""
    it = iter(batches)
    for k in range(steps + 1):
        if k == 1:
            t = time.perf_counter()
        batch = next(it)
        if before is not None:
            before(batch)
        train_step(model, opt, task, batch, cfg, device, k)
    return (time.perf_counter() - t) / steps


def loader(cfg: TrainConfig, p, workers: int):  # noqa: ANN001
    return train_loader(training_data(p, cfg.seed), p.task, batch_size=cfg.batch_size, seed=cfg.seed, start=0, stop=10_000,
                        num_workers=workers)  # fmt: skip


def measure(store: Path, images: Path, ann: Path, head: str, model_name: str, size: int, batch: int, steps: int, workers: int) -> dict:
    device = torch.device("cpu")
    cfg = with_defaults(TrainConfig(store=str(store), out="", head=head, iters=10_000, batch_size=batch, num_workers=workers, device="cpu",
                                    warmup=0))  # fmt: skip
    p = prepare_training(cfg)
    p.model.train()
    opt = make_optimizer(p.model, cfg)
    start = copy.deepcopy((p.model.state_dict(), opt.state_dict()))

    def reset() -> None:
        """Every setting runs the same steps: same weights, optimiser state, batches and RoI sampling."""
        p.model.load_state_dict(start[0])
        opt.load_state_dict(copy.deepcopy(start[1]))
        torch.manual_seed(cfg.seed)

    reset()
    cached = timed_steps(p.model, opt, p.task, loader(cfg, p, workers), cfg, device, steps)
    in_memory = [b for _, b in zip(range(steps + 1), loader(cfg, p, 0), strict=False)]
    reset()
    memory = timed_steps(p.model, opt, p.task, in_memory, cfg, device, steps)
    # online-frozen: decoded, view-cut images of each batch are ready; the backbone runs, then the head
    backbone = build_backbone(model_name, input_size=size, levels=[lv.name for lv in p.levels], random_init=True)
    src, refs = _source(images, ann)
    source_items = SampleDataset(src, refs, list(range(len(refs))), p.store.manifest)
    pixels = {int(i): source_items[int(i)]["pixels"] for i in p.indices}

    def forward(b) -> None:  # noqa: ANN001
        backbone.forward(torch.stack([pixels[i][v] for i, v in zip(b.index, b.view, strict=True)]))

    reset()
    online = timed_steps(p.model, opt, p.task, in_memory, cfg, device, steps, before=forward)
    reader_loader = loader(cfg, p, workers)
    reader_iter = iter(reader_loader)
    next(reader_iter)
    t = time.perf_counter()
    n = sum(len(next(reader_iter).index) for _ in range(3 * steps))
    reader_sps = n / (time.perf_counter() - t)
    head_sps = batch / memory
    return {"backbone": f"{model_name}@{size}", "head": head, "batch": batch, "from_cache_s": cached, "in_memory_s": memory,
            "online_frozen_s": online, "speedup": online / cached, "cache_overhead": cached / memory,
            "reader_samples_s": reader_sps, "head_samples_s": head_sps, "loader_headroom": reader_sps / head_sps}  # fmt: skip


def _source(images: Path, ann: Path):  # noqa: ANN202
    from fcache.extract.sources import build_source
    from fcache.spec import SourceConfig

    src = build_source(SourceConfig("coco", str(images), annotations=str(ann)))
    return src, src.samples()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="swinv2-t@256:4,swinv2-b@512:2", help="MODEL@SIZE:BATCH,...")
    ap.add_argument("--heads", default="fpn:rois=128;bifpn:layers=5,rois=128", help="head specs separated by ';'")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations, after one warm-up")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--num-workers", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fcache-heads-"))
    rows = []
    try:
        for conf in args.configs.split(","):
            model_name, rest = conf.split("@")
            size, batch = (int(x) for x in rest.split(":"))
            images, ann = build_dataset(tmp / f"data{size}", args.images, seed=0, long_side=size)
            store = tmp / f"{model_name}-{size}.zarr"
            ecfg = ExtractConfig.from_flags(dataset="coco", root=str(images), annotations=str(ann), out=str(store), model=model_name,
                                 random_init=True, input_size=size, num_workers=1, device="cpu", shard_size=4)  # fmt: skip
            run_extract(ecfg)
            for head in args.heads.split(";"):
                rows.append(measure(store, images, ann, head, model_name, size, batch, args.iters, args.num_workers))
                print(f"{conf} {head}: speed-up {rows[-1]['speedup']:.2f}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("detection heads on CPU: speed-up = online-frozen / from-cache step; cache overhead = from-cache / in-memory step "
          "(goal <= 1.10); loader headroom = reader / head samples/s (goal >= 3)")  # fmt: skip
    print(table(rows, list(rows[0])))
    print(f"results: {save('heads', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
