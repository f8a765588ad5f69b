"""The moving parts of an extraction run: per-sample decoding (in workers), batching and unit assembly.

``load_sample`` turns sample i into its view images (``SampleDataset`` wraps it for DataLoader workers);
``Batcher`` runs the backbone over batches of view images; ``UnitAssembler`` collects the encoded outputs
back into whole units, in any batch order, and hands each finished unit to the writer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fcache.common.deadline import DeadlineExceeded, deadline
from fcache.common.errors import SampleFailed
from fcache.extract.sources.base import Decoded, SampleError, SampleRef, Source
from fcache.extract.views import image_views, render, video_views
from fcache.spec import GEOMETRY_FIELDS, Geometry, Manifest, Status
from fcache.store import Unit
from fcache.store.dtypes import Encoded, encode, stored

if TYPE_CHECKING:
    from fcache.extract.backbones import Backbone


@dataclass(frozen=True)
class SampleItem:
    """One sample decoded and cut into its views: what a decode worker hands to the batcher and the assembler."""

    index: int
    key: str
    status: int  # a Status code
    message: str
    pixels: torch.Tensor  # (n_images, 3, S, S): images (V, ...) or video (V * T, ...) view-major; empty when it failed
    geometry: np.ndarray  # (V, len(GEOMETRY_FIELDS)) float32; zeros when it failed
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # worker-written targets of this sample

    @property
    def ok(self) -> bool:
        return Status(self.status).has_features

    def pin_memory(self) -> SampleItem:
        """The item with its pixels in pinned memory (DataLoader's ``pin_memory`` calls this)."""
        return dataclasses.replace(self, pixels=self.pixels.pin_memory())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (pixels as a numpy array) for a pipe between processes."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "pixels": self.pixels.numpy()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleItem:
        return cls(**{**d, "pixels": torch.from_numpy(np.asarray(d["pixels"]))})


def check_sample(item: SampleItem, on_error: str) -> None:
    """Raise SampleFailed for a failed sample under ``--on-error fail``."""
    if on_error == "fail" and item.status != Status.OK:
        raise SampleFailed(f"sample {item.key} failed ({Status(item.status).label}): {item.message}")


def load_sample(source: Source, ref: SampleRef, index: int, m: Manifest, timeout: float = 60.0) -> SampleItem:
    """Sample ``index`` decoded (under a SIGALRM deadline when on a main thread) and cut into its views; a failed
    sample has no pixels and zero geometry."""
    try:
        with deadline(timeout):
            decoded = source.decode(ref)
        geoms, pixels = view_images(decoded, ref.key, m)
    except DeadlineExceeded:
        return failed_sample(index, ref.key, m, Status.TIMEOUT, f"decoding {ref.key} took longer than {timeout:g}s")
    except SampleError as e:
        return failed_sample(index, ref.key, m, e.status, e.message)
    geometry = np.stack([g.to_array() for g in geoms])
    return SampleItem(index, ref.key, int(decoded.status), decoded.message, pixels, geometry, decoded.targets)


def failed_sample(index: int, key: str, m: Manifest, status: Status, message: str) -> SampleItem:
    """The item of a sample that could not be used."""
    return SampleItem(index, key, int(status), message, torch.zeros(0), np.zeros((m.num_views, len(GEOMETRY_FIELDS)), np.float32))


class SampleDataset(torch.utils.data.Dataset):
    """Item j: ``load_sample`` of sample ``indices[j]`` (runs in DataLoader workers, whose main thread takes SIGALRM)."""

    def __init__(self, source: Source, refs: list[SampleRef], indices: list[int], manifest: Manifest, timeout: float = 60.0) -> None:
        self.source, self.refs, self.indices, self.m, self.timeout = source, refs, indices, manifest, timeout

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> SampleItem:
        i = self.indices[j]
        return load_sample(self.source, self.refs[i], i, self.m, self.timeout)


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


@dataclass
class UnitPayload:
    """Everything ``StoreWriter.write_unit`` needs for one unit; features already in their levels' stored forms."""

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
            n_u, v = len(unit), m.num_views
            feats = {}
            for lv in m.levels:
                d, shape = stored(m.storage.form(lv.name)), (n_u, v, *m.level_shape(lv.name))
                scales = np.zeros(d.side_shape(shape), d.side) if d.side is not None else None
                feats[lv.name] = Encoded(np.zeros(d.stored_shape(shape), d.numpy), scales, np.zeros(n_u), np.zeros(n_u))
            self.open[u] = UnitPayload(unit, feats, np.zeros(n_u, np.uint8), np.zeros((n_u, v, len(GEOMETRY_FIELDS)), np.float32))
        return self.open[u]

    def start(self, item: SampleItem) -> None:
        """Register a decoded sample: its status, geometry, targets and how many images will follow."""
        i, u = item.index, item.index // self.shard
        p = self._payload(u)
        j = i - p.unit.start
        p.status[j] = item.status
        p.geometry[j] = item.geometry
        for name, value in item.targets.items():
            if name not in p.targets:
                p.targets[name] = np.zeros((len(p.unit), *np.shape(value)), dtype=np.asarray(value).dtype)
            p.targets[name][j] = value
        if not item.ok:
            p.errors.append({"key": item.key, "index": i, "status": Status(item.status).label, "message": item.message})
        p.missing += len(item.pixels)
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


class Batcher:
    """Stacks view images into backbone batches; each batch's features, encoded on the device, go to the assembler.

    Shared by the in-process pipeline and the cluster's unit tasks. ``images`` and ``seconds`` count the forwards.
    """

    def __init__(self, backbone: Backbone, assembler: UnitAssembler, batch_size: int, bases: dict[str, np.ndarray] | None = None) -> None:
        self.backbone, self.assembler, self.size = backbone, assembler, batch_size
        self.storage = assembler.m.storage
        self.bases: dict[str, Any] = dict(bases or {})  # a projected form's basis, moved to the device at first use
        self.waiting: list[tuple[int, int, torch.Tensor]] = []  # (sample index, image k, (3, S, S))
        self.images = 0
        self.seconds = 0.0

    def add(self, item: SampleItem) -> None:
        """Register a decoded sample with the assembler and queue its images, running full batches."""
        self.assembler.start(item)
        for k, img in enumerate(item.pixels):
            self.waiting.append((item.index, k, img))
            if len(self.waiting) >= self.size:
                self.flush()

    def flush(self) -> None:
        """Run the backbone over the queued images (a partial batch at the end)."""
        if not self.waiting:
            return
        t = time.perf_counter()
        feats = self.backbone.forward(torch.stack([img for _, _, img in self.waiting]))  # level -> (B, C, H, W) on the device
        for name, b in self.bases.items():
            if isinstance(b, np.ndarray):
                self.bases[name] = torch.from_numpy(b).to(feats[name].device)
        # on the device, then to the host
        encoded = {name: encode(f, self.storage.form(name), name, basis=self.bases.get(name)) for name, f in feats.items()}
        self.seconds += time.perf_counter() - t
        self.images += len(self.waiting)
        for b, (i, k, _) in enumerate(self.waiting):
            self.assembler.put(i, k, encoded, b)
        self.waiting.clear()
