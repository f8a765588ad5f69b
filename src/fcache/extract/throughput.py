"""Measured extraction throughput per device class: what `fcache plan --no-run` estimates time from.

A row is added when a benchmark has measured a backbone at an input size on a device class (``make bench-gpu``,
``benchmarks/gpu_profile.py``); for anything else the plan falls back to the forward's FLOPs at an assumed sustained
TFLOP/s and says so. Imports nothing heavy: ``--device-class`` lists the table's device classes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Throughput:
    """Images per second measured for one backbone at one input size on one device class."""

    forward_img_s: float  # the bare backbone forward
    pipeline_img_s: float  # a whole `fcache extract` (decode, forward, encode, commit): what the estimate uses
    setting: str  # how it was measured
    source: str  # where the measurement is kept


# (device class, model alias, input size) -> measured throughput; the time estimate of `fcache plan --no-run` uses it
THROUGHPUT: dict[tuple[str, str, int], Throughput] = {
    ("h100", "swinv2-l", 1024): Throughput(
        10.2, 7.25, "NVIDIA H100 80GB, bf16 autocast, batch 8, 16 cores", "benchmarks/reference/gpu_profile_h100_extract.json"
    ),
}
DEVICE_CLASSES = tuple(sorted({d for d, _, _ in THROUGHPUT}))
