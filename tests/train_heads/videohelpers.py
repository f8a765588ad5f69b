"""Clips made on the fly for the video head tests: a white square crossing a black frame, left-to-right or right-to-left.

Every right-to-left clip is the exact time reversal of a left-to-right one. FFV1 is lossless and intra-only, so the
decoder gives back the very frames written: any pooling of per-frame features that ignores time order sees the two
classes of a pair as one and the same clip, and only a head that models time can tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from click.testing import CliRunner

from fcache.cli import main

FRAMES = 8  # frames written = frames sampled per clip, so the sampled frames of a pair are exact reversals
SIZE = 64
CLASSES = ("left-to-right", "right-to-left")
EXTRACT = ["--random-init", "--model", "swinv2-t", "--input-size", str(SIZE), "--num-workers", "0", "--device", "cpu"]
EXTRACT += ["--batch-size", "32", "--shard-size", "16"]


def write_clip(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode (n, H, W, 3) uint8 frames losslessly (FFV1 in Matroska)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for i, a in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def moving_square(rng: np.random.Generator, n: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 3) frames: a white square of random side and height moving right by 8 pixels a frame."""
    side = int(rng.integers(14, 19))
    y, x0 = int(rng.integers(0, size - side)), int(rng.integers(-10, -2))
    frames = np.zeros((n, size, size, 3), np.uint8)
    for t in range(n):
        x = x0 + 8 * t
        frames[t, y : y + side, max(x, 0) : max(x + side, 0)] = 255
    return frames


def motion_folder(root: Path, pairs: int, seed: int) -> Path:
    """root/<direction>/vNNN.mkv: ``pairs`` left-to-right clips and their time reversals."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for k in range(pairs):
        frames = moving_square(rng)
        write_clip(root / CLASSES[0] / f"v{k:03d}.mkv", frames)
        write_clip(root / CLASSES[1] / f"v{k:03d}.mkv", frames[::-1])
    return root


def extract(root: Path, out: Path, *flags: str, codes: tuple[int, ...] = (0,)) -> Path:
    """``fcache extract --dataset video`` of ``root`` into ``out`` (random-init SwinV2-T at 64 px)."""
    r = CliRunner().invoke(main, ["extract", "--dataset", "video", "--root", str(root), *EXTRACT, *flags, "--out", str(out), "--json"])
    assert r.exit_code in codes, r.output
    return out
