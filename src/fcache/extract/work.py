"""The moving parts of an extraction run: per-sample decoding (in workers) and unit assembly (in the driver).

``SampleDataset`` turns sample i into its view images; ``UnitAssembler`` collects backbone outputs
back into whole units, in any batch order, and hands each finished unit to the writer.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fcache.extract.sources.base import Decoded, SampleError, SampleRef, Source
from fcache.extract.views import image_views, render, video_views
from fcache.spec import GEOMETRY_FIELDS, Geometry, Manifest, Status
from fcache.store import Unit
from fcache.store.encoding import STORED_DTYPES, Encoded


class SampleDataset(torch.utils.data.Dataset):
    """Item j: sample ``indices[j]`` decoded and cut into its views (runs in DataLoader workers).

    Returns ``{"index", "key", "status", "message", "pixels": (n_images, 3, S, S), "geometry": (V, G),
    "targets": {name: array}}``; a failed sample has no pixels and zero geometry.
    """

    def __init__(self, source: Source, refs: list[SampleRef], indices: list[int], manifest: Manifest, timeout: float = 60.0) -> None:
        self.source, self.refs, self.indices, self.m, self.timeout = source, refs, indices, manifest, timeout

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.indices[j]
        ref = self.refs[i]
        item: dict[str, Any] = {"index": i, "key": ref.key, "status": int(Status.OK), "message": "", "targets": {}}
        try:
            with _deadline(self.timeout, ref.key):
                decoded = self.source.decode(ref)
            geoms, pixels = view_images(decoded, ref.key, self.m)
        except SampleError as e:
            return {**item, "status": int(e.status), "message": e.message, "pixels": torch.zeros(0), "geometry": self._zero_geometry()}
        return {
            **item,
            "status": int(decoded.status),
            "message": decoded.message,
            "pixels": pixels,
            "geometry": np.stack([g.to_array() for g in geoms]),
            "targets": decoded.targets,
        }

    def _zero_geometry(self) -> np.ndarray:
        return np.zeros((self.m.num_views, len(GEOMETRY_FIELDS)), np.float32)


def view_images(d: Decoded, key: str, m: Manifest, only: int | None = None) -> tuple[list[Geometry], torch.Tensor]:
    """Geometry of every view of a decoded sample and the images of all views (or of view ``only``).

    Returns (geometries, images): images (V, 3, S, S), video (V * T, 3, S, S) view-major; one view's only with ``only``.
    """
    p, canvas = m.preprocessing, m.backbone.input_size
    wanted = range(m.num_views) if only is None else [only]
    if d.frames is not None:
        t = int(p.frames or 1)
        times = d.times if d.times is not None else np.zeros(len(d.frames))
        clips = [(float(times[c * t]), float(times[c * t + t - 1])) for c in range(p.clips)]
        geoms = video_views(d.frames.shape[1], d.frames.shape[2], p, canvas, clips)
        imgs = [render(d.frames[(v // p.crops) * t + f], geoms[v], p.mean, p.std) for v in wanted for f in range(t)]
        return geoms, torch.stack(imgs)
    if d.image is None:
        raise SampleError(Status.DECODE_ERROR, "the source returned neither an image nor frames")
    geoms = image_views(d.image.shape[0], d.image.shape[1], p, canvas, key, d.orientation)
    return geoms, torch.stack([render(d.image, geoms[v], p.mean, p.std) for v in wanted])


@contextlib.contextmanager
def _deadline(seconds: float, key: str) -> Iterator[None]:
    """Raise SampleError(TIMEOUT) when decoding outlives ``seconds`` (main thread of a process only)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SampleError(Status.TIMEOUT, f"decoding {key} took longer than {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class UnitPayload:
    """Everything ``StoreWriter.write_unit`` needs for one unit; features already in the store's dtype."""

    unit: Unit
    features: dict[str, Encoded]
    status: np.ndarray
    geometry: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    missing: int = 0  # view images still to come from the backbone


class UnitAssembler:
    """Collects per-image encoded backbone outputs into unit buffers; yields each unit once all its images are in."""

    def __init__(self, manifest: Manifest, units: list[Unit]) -> None:
        self.m = manifest
        self.frames = int(manifest.preprocessing.frames or 1) if manifest.video else 1
        self.todo = {u.index: u for u in units}
        self.open: dict[int, UnitPayload] = {}
        self.unstarted: dict[int, int] = {u.index: len(u) for u in units}  # samples not yet seen per unit
        self.shard = manifest.storage.shard_size

    def _payload(self, u: int) -> UnitPayload:
        if u not in self.open:
            unit, m = self.todo[u], self.m
            n_u, v, dtype = len(unit), m.num_views, m.storage.dtype
            feats = {}
            for lv in m.levels:
                shape = (n_u, v, *m.level_shape(lv.name))
                scales = np.zeros(shape[:-2], np.float32) if dtype == "int8" else None
                feats[lv.name] = Encoded(np.zeros(shape, STORED_DTYPES[dtype]), scales, np.zeros(n_u), np.zeros(n_u))
            self.open[u] = UnitPayload(unit, feats, np.zeros(n_u, np.uint8), np.zeros((n_u, v, len(GEOMETRY_FIELDS)), np.float32))
        return self.open[u]

    def start(self, item: dict[str, Any]) -> None:
        """Register a decoded sample: its status, geometry, targets and how many images will follow."""
        i, u = item["index"], item["index"] // self.shard
        p = self._payload(u)
        j = i - p.unit.start
        p.status[j] = item["status"]
        p.geometry[j] = item["geometry"]
        for name, value in item["targets"].items():
            if name not in p.targets:
                p.targets[name] = np.zeros((len(p.unit), *np.shape(value)), dtype=np.asarray(value).dtype)
            p.targets[name][j] = value
        if not Status(item["status"]).has_features:
            p.errors.append({"key": item["key"], "index": i, "status": Status(item["status"]).label, "message": item["message"]})
        p.missing += len(item["pixels"])
        self.unstarted[u] -= 1

    def put(self, i: int, k: int, encoded: dict[str, Encoded], b: int) -> None:
        """Item b of an encoded batch is image k of sample i: view k (images) or view k // T, frame k % T (video)."""
        p = self.open[i // self.shard]
        j = i - p.unit.start
        where = (j, k // self.frames, k % self.frames) if self.m.video else (j, k)
        for name, enc in encoded.items():
            dest = p.features[name]
            dest.values[where] = enc.values[b]
            if dest.scales is not None and enc.scales is not None:
                dest.scales[where] = enc.scales[b]
            dest.sq_err[j] += enc.sq_err[b]
            dest.sq_ref[j] += enc.sq_ref[b]
        p.missing -= 1

    def ready(self) -> list[UnitPayload]:
        done = [u for u, p in self.open.items() if p.missing == 0 and self.unstarted[u] == 0]
        return [self.open.pop(u) for u in sorted(done)]

    def open_units(self) -> list[int]:
        return sorted(self.open)
