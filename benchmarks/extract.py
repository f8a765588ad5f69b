"""Extraction speed per attention and compile variant: the bare backbone forward and the whole pipeline.

The pipeline is the whole `fcache extract` run after start-up (decoding, views, backbone, encoding + compression +
commit on the writer thread); the bare forward runs the same backbone on batches already in memory. A variant is an
``--attention`` (``sdpa``: fcache's default, ``timm``: timm's own forward), optionally under ``torch.compile``
(``sdpa+compile``: compiled once per setting, its compile time reported). Variants are interleaved (their order
rotates) and each measurement is repeated (``--repeats``): figures are medians, ``spread`` is (max - min) / median.
Columns: ``pipe/bare`` (goal >= 0.90 at 256) and the speed-ups over ``timm`` in the same run (goal: pipeline >= 1.2
with sdpa, SwinV2-T at 512 on a 2-core CPU). On a shared machine the CPU time is steadier than the wall clock:
``bare_cpu_ms`` is the process's CPU per image of the bare forward, ``cpu_bare/pipe`` that over the pipeline's CPU per
image (decode workers included): the share of the pipeline's work that is the forward (exact with ``--threads 1``,
where no OpenMP thread spins while waiting).
``decode_cpu_ms`` is the CPU per photo of the loader's work for it (decode, views, render) in the calling thread (what
torch's other threads take of normalising is not counted; all of it with ``--threads 1``).
``--memory SIZE``: the peak resident memory one forward (batch 1) adds at SIZE, per variant, each in a fresh process.
Usage: python benchmarks/extract.py [--models swinv2-t,swinv2-b] [--sizes 256:0,512:1] [--variants sdpa,timm]
       [--repeats 3] [--images 16] [--batch-size 4] [--seconds 4] [--skip-pipeline] [--memory 1024]
(SIZE:WORKERS sets the DataLoader workers of one size; on 2 cores decoding in the main thread wins at small sizes)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photo_folder, save, table  # noqa: E402
from fcache.extract import driver  # noqa: E402
from fcache.extract.backbones import Backbone, build_backbone  # noqa: E402
from fcache.extract.config import ExtractConfig  # noqa: E402

BASELINE = "timm"  # speed-ups are over this variant, measured in the same run
COLUMNS = ["model", "size", "batch", "workers", "variant", "bare_img_s", "bare_spread", "pipeline_img_s", "pipe_spread",
           "pipe/bare", "bare_vs_timm", "pipe_vs_timm", "compile_s", "bare_cpu_ms", "cpu_bare/pipe", "loader_wait_s",
           "forward_s", "writer_wait_s", "decode_cpu_ms"]  # fmt: skip


def build(model: str, size: int, device: str, variant: str) -> Backbone:
    """The variant's backbone (``ATTENTION`` or ``ATTENTION+compile``), random-init."""
    attention, _, extra = variant.partition("+")
    if extra not in ("", "compile"):
        raise SystemExit(f"variant {variant!r}: ATTENTION or ATTENTION+compile")
    bb = build_backbone(model, input_size=size, random_init=True, device=device, attention=attention)
    if extra:
        bb.model = torch.compile(bb.model, dynamic=False)
    return bb


def bare_images_per_s(model: str, size: int, batch: int, device: str, seconds: float = 8.0, attention: str = "sdpa") -> float:
    """Images/s of the bare forward of a freshly built backbone (after one warm-up batch)."""
    bb = build(model, size, device, attention)
    x = torch.randn(batch, 3, size, size)
    bb.forward(x)
    return timed_forwards(bb, x, seconds)


def timed_forwards(bb: Backbone, x: torch.Tensor, seconds: float) -> float:
    """Forwards of ``x`` (features copied back to the host) for about ``seconds``, at least two: images/s."""
    return cpu_timed_forwards(bb, x, seconds)[0]


def cpu_timed_forwards(bb: Backbone, x: torch.Tensor, seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of forwards of ``x`` for about ``seconds``, at least two."""
    n, t, cpu = 0, time.perf_counter(), cpu_seconds()
    while n < 2 * len(x) or time.perf_counter() - t < seconds:
        {k: v.cpu() for k, v in bb.forward(x).items()}
        n += len(x)
    return n / (time.perf_counter() - t), (cpu_seconds() - cpu) / n * 1e3


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its ended children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def built_as(bb: Backbone | None) -> Iterator[None]:
    """`fcache extract` runs with this backbone, already built (a compiled one compiles once), when one is given."""
    saved = driver.build_backbone
    if bb is not None:
        driver.build_backbone = lambda *a, **k: bb  # type: ignore[assignment]
    try:
        yield
    finally:
        driver.build_backbone = saved  # type: ignore[assignment]


def pipeline(model: str, size: int, batch: int, workers: int, device: str, root: Path, out: Path, attention: str = "sdpa",
             backbone: Backbone | None = None) -> dict:  # fmt: skip
    """One whole `fcache extract` of the photos in ``root`` (into a replaced ``out``): images/s and the driver's timing."""
    cfg = ExtractConfig.from_flags(dataset="folder", root=str(root), out=str(out), model=model, random_init=True, input_size=size,
                                   batch_size=batch, num_workers=workers, device=device, shard_size=8, overwrite=True,
                                   attention=attention)  # fmt: skip
    cpu: list[float] = []
    with built_as(backbone), cpu_of_pipeline(cpu):
        s = driver.run_extract(cfg)
    return {"images_per_s": s.images_per_s, "cpu_ms": cpu[0] / max(s.processed, 1) * 1e3, **{f"{k}_s": v for k, v in s.timing.items()}}


@contextlib.contextmanager
def cpu_of_pipeline(seconds: list[float]) -> Iterator[None]:
    """Appends the CPU time of the driver's pipeline (decode, forward, encode, commit; not start-up) to ``seconds``."""
    saved = driver._pipeline

    def timed(*args: Any, **kw: Any) -> None:
        t = cpu_seconds()
        try:
            saved(*args, **kw)
        finally:
            seconds.append(cpu_seconds() - t)

    driver._pipeline = timed  # type: ignore[assignment]
    try:
        yield
    finally:
        driver._pipeline = saved  # type: ignore[assignment]


def measure(model: str, size: int, workers: int, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Every variant at one setting, interleaved and repeated: one row per variant."""
    x = torch.randn(args.batch_size, 3, size, size)
    built = {v: build(model, size, args.device, v) for v in args.variants}
    compile_s = {}
    for v, bb in built.items():  # warm-up; compiles a compiled one
        t = time.perf_counter()
        bb.forward(x)
        compile_s[v] = time.perf_counter() - t if "+compile" in v else 0.0
    bare: dict[str, list[tuple[float, float]]] = {v: [] for v in built}
    pipe: dict[str, list[dict]] = {v: [] for v in built}
    for rep in range(args.repeats):
        order = args.variants[rep % len(args.variants) :] + args.variants[: rep % len(args.variants)]
        for v in order:
            bare[v].append(cpu_timed_forwards(built[v], x, args.seconds))
            if not args.skip_pipeline:
                out = Path(tempfile.mkdtemp(prefix="fcache-bench-out-")) / "s.zarr"
                pipe[v].append(pipeline(model, size, args.batch_size, workers, args.device, root, out, backbone=built[v]))
                shutil.rmtree(out.parent, ignore_errors=True)
            print(f"  {model}@{size} {v} rep {rep}: bare {bare[v][-1][0]:.2f} img/s"
                  + (f", pipeline {pipe[v][-1]['images_per_s']:.2f}" if pipe[v] else ""), file=sys.stderr, flush=True)  # fmt: skip
    rows = rows_of(model, size, workers, args, bare, pipe, compile_s)
    decoding = decode_cpu_ms(model, size, root)
    return [{**r, "decode_cpu_ms": decoding} for r in rows]


def decode_cpu_ms(model: str, size: int, root: Path, passes: int = 3) -> float:
    """CPU ms per photo of what the pipeline's loader does for it (decode, views, render; ``load_sample``) in the calling
    thread, the median of ``passes`` passes over the photos in ``root``."""
    from fcache.extract.stages import load_sample

    cfg = ExtractConfig.from_flags(dataset="folder", root=str(root), out=str(root.parent / "unused.zarr"), model=model,
                                   random_init=True, input_size=size)  # fmt: skip
    source, refs, _, m = driver.prepare(cfg, meta=True)
    per = []
    for _ in range(passes + 1):  # the first pass warms the page cache
        t = time.thread_time()
        for i, ref in enumerate(refs):
            load_sample(source, ref, i, m)
        per.append((time.thread_time() - t) / len(refs) * 1e3)
    return statistics.median(per[1:])


def rows_of(model: str, size: int, workers: int, args: argparse.Namespace, bare: dict[str, list[tuple[float, float]]],
            pipe: dict[str, list[dict]], compile_s: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """Medians, spreads and ratios of one setting's measurements."""
    rows = []
    base_bare = statistics.median(r for r, _ in bare[BASELINE]) if BASELINE in bare else None
    base_pipe = statistics.median(p["images_per_s"] for p in pipe[BASELINE]) if pipe.get(BASELINE) else None
    for v in bare:
        row: dict[str, Any] = {"model": model, "size": size, "batch": args.batch_size, "workers": workers, "variant": v}
        rates = [r for r, _ in bare[v]]
        row |= {"bare_img_s": statistics.median(rates), "bare_spread": spread(rates), "compile_s": compile_s[v]}
        row |= {"bare_cpu_ms": statistics.median(c for _, c in bare[v])}
        row |= {"bare_vs_timm": row["bare_img_s"] / base_bare} if base_bare else {}
        if pipe[v]:
            rates = [p["images_per_s"] for p in pipe[v]]
            row |= {"pipeline_img_s": statistics.median(rates), "pipe_spread": spread(rates)}
            row["pipe/bare"] = row["pipeline_img_s"] / row["bare_img_s"]
            row |= {"pipe_vs_timm": row["pipeline_img_s"] / base_pipe} if base_pipe else {}
            row |= {k: statistics.median(p[k] for p in pipe[v]) for k in ("cpu_ms", "loader_wait_s", "forward_s", "writer_wait_s")}
            row["cpu_bare/pipe"] = row["bare_cpu_ms"] / row.pop("cpu_ms")
        rows.append(row)
    return rows


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def peak_forward_mb(model: str, size: int, variant: str) -> float:
    """Peak resident MB one forward (batch 1) adds at ``size``, measured in a fresh process (Linux: VmHWM, reset first)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_peak_forward_mb, (model, size, variant))


def _peak_forward_mb(model: str, size: int, variant: str) -> float:
    bb = build(model, size, "cpu", variant)
    x = torch.randn(1, 3, size, size)
    bb.forward(x)  # warm-up (and compilation)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size
    before = _status_kb("VmRSS")
    bb.forward(x)
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="swinv2-t")
    ap.add_argument("--sizes", default="256:0,512:1", help="SIZE[:WORKERS],... ('' with --memory: memory only)")
    ap.add_argument("--variants", default="sdpa,timm", help="ATTENTION[+compile],... (sdpa, timm)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16, help="photos per pipeline run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0, help="per bare-forward measurement")
    ap.add_argument("--skip-pipeline", action="store_true", help="bare forward only")
    ap.add_argument("--memory", type=int, default=0, help="also the peak memory of one forward at this size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 makes CPU times exact")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.variants = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="fcache-bench-"))
    photo_folder(tmp / "images", args.images)
    rows, memory = [], []
    try:
        for model in args.models.split(","):
            for spec in filter(None, args.sizes.split(",")):
                size_text, _, workers_text = spec.partition(":")
                rows += measure(model, int(size_text), int(workers_text or args.num_workers), args, tmp / "images")
            if args.memory:
                memory += [{"model": model, "size": args.memory, "variant": v, "peak_mb": peak_forward_mb(model, args.memory, v)}
                           for v in args.variants]  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"extraction speed ({args.images} real photos, medians of {args.repeats}; goals: pipe/bare >= 0.90, pipe_vs_timm >= 1.2)")
    if rows:
        print(table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    if memory:
        print(f"\npeak memory of one forward, batch 1\n{table(memory, list(memory[0]))}")
    print(f"results: {save('extract', {'args': vars(args), 'rows': rows, 'memory': memory})}")


if __name__ == "__main__":
    main()
