"""Video: extraction frames/s of SwinV2-T over clips, and the training step time of the video heads (paper Table 4).

Extraction: clips made on the fly (a square crossing a real photo, 320 x 240, mp4) run through `fcache extract --dataset
video --levels p5` (decoding in a DataLoader worker, views, backbone, writer); images/s counts frames. The bare forward
of the same backbone on frames already in memory is measured alongside (benchmarks/extract.py), for the overhead ratio.
Heads: SwinV2-B-shaped p5 features (1024 channels, 16 frames of 7 x 7 at 224 px), Kinetics-400's 400 classes; one step
= forward + cross-entropy + backward + AdamW step, the loop's optimiser.
Usage: python benchmarks/video_heads.py [--size 224] [--clips 4] [--frames 16] [--batch 8] [--iters 2] [--heads SPEC;SPEC]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photos, save, table  # noqa: E402
from extract import bare_images_per_s  # noqa: E402
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract  # noqa: E402
from fcache.spec import Geometry, LevelSpec  # noqa: E402
from fcache.train_heads.config import TrainConfig  # noqa: E402
from fcache.train_heads.defaults import with_defaults  # noqa: E402
from fcache.train_heads.loop import make_optimizer, trainable_parameters  # noqa: E402
from fcache.train_heads.task import Batch  # noqa: E402
from fcache.train_heads.video import VideoTask, parse_video_head  # noqa: E402

HEADS = "linear;temporal:blocks=4;global:blocks=4"
SWINV2_B_P5 = LevelSpec("p5", 1024, 32)
CLASSES = 400


def write_clips(root: Path, clips: int, frames: int) -> None:
    """root/<class>/cNN.mp4: 2 classes, a white square crossing a photo over ``3 * frames`` frames at 320 x 240."""
    backgrounds = photos(clips)
    for k in range(clips):
        folder = root / f"class{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        bg = np.asarray(av.VideoFrame.from_ndarray(backgrounds[k], format="rgb24").reformat(320, 240).to_ndarray(format="rgb24"))
        with av.open(str(folder / f"c{k:02d}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            for t in range(3 * frames):
                a = bg.copy()
                x = (8 * t) % 280
                a[100:140, x : x + 40] = 255
                frame = av.VideoFrame.from_ndarray(a, format="rgb24")
                frame.pts = t
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def extraction(size: int, clips: int, frames: int, batch: int, workers: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fcache-video-bench-"))
    try:
        write_clips(tmp / "clips", clips, frames)
        cfg = ExtractConfig.from_flags(
            dataset="video",
            root=str(tmp / "clips"),
            out=str(tmp / "v.zarr"),
            model="swinv2-t",
            random_init=True,
            input_size=size,
            levels=("p5",),
            frames=frames,
            batch_size=batch,
            num_workers=workers,
            device="cpu",
            shard_size=2,
        )
        s = run_extract(cfg)
        bare = bare_images_per_s("swinv2-t", size, batch, "cpu")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": "swinv2-t",
        "size": size,
        "clips": clips,
        "frames": frames,
        "batch": batch,
        "pipeline_frames_s": s.images_per_s,
        "bare_frames_s": bare,
        "ratio": s.images_per_s / bare,
    }


def head_step(spec: str, batch: int, frames: int, grid: int, steps: int) -> dict:
    """Mean seconds of ``steps`` training steps (after one warm-up step) of the head ``spec`` on random features."""
    names = tuple(f"class{k}" for k in range(CLASSES))
    task = VideoTask(parse_video_head(spec), names, frames=frames, grid=(grid, grid))
    torch.manual_seed(0)
    model = task.build((SWINV2_B_P5,)).train()
    optimizer = make_optimizer(model, with_defaults(TrainConfig(store="", out="", head=spec, iters=1, task="video")))
    features = {"p5": torch.randn(batch, frames, SWINV2_B_P5.channels, grid, grid)}  # (B, T, C, H, W)
    labels = [torch.tensor(k % CLASSES) for k in range(batch)]
    b = Batch(list(range(batch)), [0] * batch, features, [Geometry(1, 1, 1)] * batch, labels, [{}] * batch)

    def step() -> None:
        loss = torch.stack(list(task.loss(model, b).values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    return {"head": str(task.head), "params_M": trainable_parameters(model) / 1e6, "batch": batch, "step_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="SwinV2-T input size for the extraction run")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--extract-batch", type=int, default=16, help="frames per backbone forward")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="clips per head step")
    ap.add_argument("--grid", type=int, default=7, help="p5 side: 7 at 224 px")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations, after one warm-up")
    ap.add_argument("--heads", default=HEADS, help="head specs separated by ';'")
    args = ap.parse_args()
    extract_row = extraction(args.size, args.clips, args.frames, args.extract_batch, args.num_workers)
    print(f"extraction: {extract_row['pipeline_frames_s']:.2f} frames/s", file=sys.stderr)
    head_rows = []
    for spec in args.heads.split(";"):
        head_rows.append(head_step(spec, args.batch, args.frames, args.grid, args.iters))
        print(f"{spec}: {head_rows[-1]['step_s']:.2f} s/step", file=sys.stderr)
    print(f"extraction, CPU ({torch.get_num_threads()} threads), p5 only")
    print(table([extract_row], list(extract_row)))
    print(f"\nhead training step, SwinV2-B-shaped p5 ({args.frames} x 1024 x {args.grid} x {args.grid}), {CLASSES} classes, CPU")
    print(table(head_rows, list(head_rows[0])))
    rows = [
        summary_row(
            f"extract swinv2-t@{args.size} p5",
            extract_row["pipeline_frames_s"],
            "frames/s",
            f"bare forward ratio {extract_row['ratio']:.3f}",
        )
    ]
    rows += [
        summary_row(f"step {r['head'].partition(':')[0]}", r["step_s"], f"s/step (batch {r['batch']})", f"{r['params_M']:.2f} M params")
        for r in head_rows
    ]
    payload = {"args": vars(args), "extraction": extract_row, "heads": head_rows, "rows": rows}
    print(f"results: {save('video_heads', payload)}")


def summary_row(measure: str, value: float, unit: str, note: str) -> dict:
    """One row of the ``rows`` table that run_all.py's summary shows."""
    return {"measure": measure, "value": value, "unit": unit, "note": note}


if __name__ == "__main__":
    main()
