"""A trained head with its frozen backbone, rebuilt from a RUN folder alone: what ``fcache.load`` returns, what
``fcache predict`` runs on images and videos, and what ``fcache export`` traces.

The online path is the extraction path, step for step: an input is decoded as ``fcache extract`` decodes it
(``extract.decode``: EXIF orientation, alpha, 16-bit...), cut into the run's views by ``extract.stages.view_images``
(resize + pad to the canvas and the test views asked for; video: clips x crops), and the view images of consecutive
inputs run through the backbone in batches of ``batch_size`` images, as ``extract``'s ``Batcher`` runs them. The
features of each input become the item evaluation reads from a store (view 0, or every view at once), items are
collated by the task and scored by ``task.predict`` as ``fcache eval`` does. A prediction made here therefore equals
the one ``fcache eval`` makes from an fp32 store of the same images (tested for every task).
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcache.common.devices import resolve_device
from fcache.common.errors import InputError
from fcache.extract.backbones import Backbone
from fcache.extract.decode import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Decoded,
    SampleError,
    clip_indices,
    decode_image,
    decode_video,
    to_rgb,
)
from fcache.extract.rebuild import backbone_of
from fcache.extract.stages import view_images
from fcache.extract.views import expand_test_views
from fcache.spec import Geometry, Manifest, Preprocessing, Status, StorageSpec, Targets
from fcache.train_heads.data import KEY, VIEW_GEOMETRY, VIEW_NAMES, Collate
from fcache.train_heads.evaluation import load_head
from fcache.train_heads.optim import autocast
from fcache.train_heads.runrecord import RANDOM_INIT, TrainingRecord, identity_differences
from fcache.train_heads.task import OutputOptions, Task
from fcache.train_heads.tasks import task_def

Input = Any  # a path, a PIL image, an (H, W, 3) / (3, H, W) uint8 array or tensor; video: a path or (N, H, W, 3) frames
OnError = Callable[[int, str, SampleError], bool]  # (input index, its name, why it cannot be used) -> go on?


@dataclass
class Sample:
    """One input, decoded: its name, its pixels (kept for drawing) and its views' geometry and features."""

    index: int
    name: str
    decoded: Decoded
    geometry: np.ndarray  # (V, len(GEOMETRY_FIELDS))
    features: dict[str, torch.Tensor]  # level -> (V, C, H, W) or video (V, T, C, H, W)

    @property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8: the image, or a video's first sampled frame."""
        return self.decoded.image if self.decoded.image is not None else self.decoded.frames[0]  # type: ignore[index]


@dataclass
class _Open:
    """A sample whose view images are on their way through the backbone."""

    sample: Sample
    images: int
    done: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)


def check_weights(record: TrainingRecord, weights: str, random_init: bool) -> None:
    """The flags rebuild the run's backbone weights: ``--random-init`` exactly when it was random, a file when it was one."""
    recorded = record.require_features().backbone.weights
    seed = record.require_features().preprocessing.seed
    if weights and (recorded == RANDOM_INIT or recorded.startswith("timm:")):
        raise InputError(f"the run was trained on features of {recorded} weights, not of a weights file; drop --weights")
    if recorded == RANDOM_INIT and not random_init:
        raise InputError(f"the run was trained on features of a random-init backbone (seed {seed}); pass --random-init to rebuild it")
    if random_init and recorded != RANDOM_INIT:
        raise InputError(f"the run was trained on features of {recorded[:24]} weights, not random-init ones; drop --random-init")


class TrainedModel(nn.Module):
    """Frozen backbone + trained head of a RUN, with the run's preprocessing and its task's postprocessing.

    ``model(x)`` of one input (a path, a PIL image, the array of one image or video) returns its prediction, and
    ``model([x, ...])`` (or a batch array) a list of them, as its task presents it (``TaskDef.outputs.present``): detection
    a list of COCO result records (bbox xywh in original pixels, score, category id and name, RLE mask) with a score of
    at least ``score_thr``; segmentation an (H, W) int64 tensor of class indices at the input's resolution; depth an
    (H, W) float32 tensor of metres at the input's resolution; classification and video a dict with ``probs`` (K,) and
    ``top`` (the ``top_k`` best classes as ``{"class", "name", "score"}``).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, task: Task, record: TrainingRecord, manifest: Manifest, *,
                 batch_size: int = 8, score_thr: float = 0.0, top_k: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.backbone_ref = backbone
        self.backbone, self.head = backbone.model, head
        self.task, self.record, self.manifest = task, record, manifest
        self.batch_size, self.score_thr, self.top_k = batch_size, score_thr, top_k
        self.task_def = task_def(task.name)
        self.eval_views = self.task_def.eval_views

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        *,
        weights: str = "",
        random_init: bool = False,
        device: str = "auto",
        test_views: Sequence[str] = (),
        clips: int | None = None,
        crops: int | None = None,
        batch_size: int = 8,
        score_thr: float = 0.0,
        top_k: int = 5,
        attention: str = "sdpa",
    ) -> TrainedModel:
        """Rebuild the run's backbone (its recorded model, weights, input size, levels and normalisation) and head.

        Args:
            weights: the weights file the training store was extracted with (its sha256 must match).
            random_init: the run was trained on random-init features: rebuild them (same seed); never implied.
            device: where the backbone and head run, as ``--device``: auto (CUDA when available), cpu, cuda, cuda:K, mps.
            test_views: ``flip`` and/or ``ms``, as ``fcache extract --test-views``: views averaged by the heads whose task
                evaluates every view (segmentation, depth, classification; detection evaluates the plain view only).
            clips, crops: video views (default: the training store's).
            attention: how the backbone computes its window attention, as ``--attention`` (``sdpa`` or ``timm``).
        """
        head = load_head(run)
        record = head.record
        features = record.require_features()
        check_weights(record, weights, random_init)
        tdef = task_def(record.config.task)
        views = expand_test_views(tuple(test_views))
        if views and (tdef.eval_views != "all" or features.preprocessing.frames is not None):
            reads = "clips x crops (--clips, --crops)" if features.preprocessing.frames is not None else "the plain view only"
            raise InputError(f"--test-views adds views a head averages; a {tdef.name} head reads {reads}")
        manifest = inference_manifest(features.backbone, features.preprocessing, features.dataset, views, clips, crops)
        backbone = backbone_of(manifest, weights=weights, device=resolve_device(device), attention=attention)
        built = Preprocessing(mean=backbone.mean, std=backbone.std, resize=manifest.preprocessing.resize, seed=manifest.preprocessing.seed)
        diffs = identity_differences((backbone.info, built), (features.backbone, features.preprocessing), record.levels)
        if diffs:
            raise InputError(f"the backbone built here differs from the run's ({'; '.join(diffs)}; built != run); use the run's libraries")
        head.model.to(backbone_device(backbone))
        return cls(backbone, head.model, head.task, record, manifest, batch_size=batch_size, score_thr=score_thr, top_k=top_k)

    @property
    def device(self) -> torch.device:
        return backbone_device(self.backbone_ref)

    @property
    def video(self) -> bool:
        return self.manifest.video

    # -- inputs -------------------------------------------------------------------------------------------------
    def decode(self, x: Input, index: int) -> tuple[str, Decoded]:
        """(name, decoded pixels) of one input, decoded as ``fcache extract`` decodes; SampleError for a file that cannot
        be used (its message names the file), InputError for an array or image that is no input."""
        if isinstance(x, (str, Path)):
            name = str(x)
            self._check_kind(name)
            if self.video:
                p = self.manifest.preprocessing
                decoded = decode_video(x, frames=int(p.frames or 1), clips=p.clips)
            else:
                decoded = decode_image(x)
        else:
            name, decoded = f"input{index}", self._decode_array(x)
        pixels = decoded.image if decoded.image is not None else decoded.frames
        if pixels is not None and min(pixels.shape[-3:-1]) < 1:
            raise InputError(f"{name}: the image has no pixels ({pixels.shape[-2]}x{pixels.shape[-3]}); give an image of at least 1x1")
        return name, decoded

    def _check_kind(self, path: str) -> None:
        """A video file given to an image head (or an image to a video head) is named for what it is."""
        suffix = Path(path).suffix.lower()
        other, takes = (IMAGE_EXTENSIONS, "videos") if self.video else (VIDEO_EXTENSIONS, "images")
        if suffix in other:
            wanted = ", ".join(VIDEO_EXTENSIONS if self.video else IMAGE_EXTENSIONS)
            what = "an image" if self.video else "a video"
            raise SampleError(Status.DECODE_ERROR, f"{path}: {what} ({suffix}); a {self.task.name} head takes {takes} ({wanted})")

    def _decode_array(self, x: Any) -> Decoded:
        from PIL import Image

        if isinstance(x, Image.Image):
            return Decoded(image=to_rgb(x))
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if a.dtype != np.uint8:
            raise InputError(f"an input array must be uint8 RGB (got {a.dtype}); convert it, or pass PIL images or paths")
        if self.video:
            if a.ndim != 4 or a.shape[-1] != 3:
                raise InputError(f"a video input is (frames, H, W, 3) uint8 (got shape {a.shape})")
            if len(a) == 0:
                raise InputError("a video input has no frames (shape (0, H, W, 3))")
            p = self.manifest.preprocessing
            idx = clip_indices(len(a), int(p.frames or 1), p.clips)
            return Decoded(frames=np.ascontiguousarray(a[idx]), times=np.zeros(len(idx)))
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise InputError(f"an image input is (H, W, 3) or (3, H, W) uint8 (got shape {a.shape})")
        return Decoded(image=np.ascontiguousarray(a))

    def single(self, x: Any) -> bool:
        """Whether ``x`` is one input (a path, a PIL image, the array of one image or video) rather than several."""
        from PIL import Image

        if isinstance(x, (str, Path, Image.Image)):
            return True
        return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == (4 if self.video else 3)

    # -- the online path ----------------------------------------------------------------------------------------
    def samples(self, inputs: Iterable[Input], on_error: OnError | None = None) -> Iterator[Sample]:
        """Each input decoded, cut into its views and run through the backbone (batches of ``batch_size`` view images
        over consecutive inputs, as extraction batches them), in input order.

        Args:
            on_error: called with (index, name, error) for an input that cannot be used, which is then left out; it
                returns whether to go on (False: the inputs before it are finished and no further one is read).
                None: such an input raises InputError (one line naming it).
        """
        waiting: list[tuple[_Open, torch.Tensor]] = []  # view images queued for the next forward
        opened: deque[_Open] = deque()

        def flush() -> Iterator[Sample]:
            if waiting:
                feats = self.backbone_ref.forward(torch.stack([img for _, img in waiting]))  # level -> (B, C, H, W)
                for b, (entry, _) in enumerate(waiting):
                    entry.done.append({lv: f[b] for lv, f in feats.items()})
                waiting.clear()
            while opened and len(opened[0].done) == opened[0].images:
                entry = opened.popleft()
                entry.sample.features = self._stack(entry.done)
                yield entry.sample

        for k, x in enumerate(inputs):
            try:
                name, decoded = self.decode(x, k)
                geoms, images = view_images(decoded, name, self.manifest)  # (V or V * T, 3, S, S)
            except SampleError as e:
                if on_error is None:
                    raise InputError(e.message) from None
                if on_error(k, str(x) if isinstance(x, (str, Path)) else f"input{k}", e):
                    continue
                break
            entry = _Open(Sample(k, name, decoded, np.stack([g.to_array() for g in geoms]), {}), len(images))
            opened.append(entry)
            for img in images:
                waiting.append((entry, img))
                if len(waiting) >= self.batch_size:
                    yield from flush()
        yield from flush()

    def _stack(self, per_image: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """level -> (V, C, H, W), or (V, T, C, H, W) for video, from the per-image features in view-major order."""
        out = {}
        for lv in self.record.levels:
            x = torch.stack([f[lv.name] for f in per_image])  # (n_images, C, H, W)
            out[lv.name] = x.reshape(self.manifest.num_views, -1, *x.shape[1:]) if self.video else x
        return out

    def item(self, s: Sample, *, image_id: int | None = None) -> dict[str, Any]:
        """The item ``eval_data`` would read for this sample from a store: view 0, or every view at once."""
        g0 = Geometry.from_array(s.geometry[0])
        if self.eval_views == "all":
            feats = s.features
            targets: dict[str, Any] = {KEY: s.name, VIEW_GEOMETRY: s.geometry.copy(), VIEW_NAMES: self.manifest.view_names}
        else:
            feats = {lv: x[0] for lv, x in s.features.items()}
            record = {"id": s.index if image_id is None else image_id, "file_name": Path(s.name).name}
            targets = {Targets.IMAGE: json.dumps(record | {"width": round(g0.orig_w), "height": round(g0.orig_h)})}
        return {"index": s.index, "view": 0, "features": feats, "geometry": torch.from_numpy(s.geometry[0].copy()), "targets": targets}

    @torch.inference_mode()
    def predict_items(self, items: list[Mapping[str, Any]]) -> list[Any]:
        """``task.predict`` of collated items, as ``fcache eval`` runs it (under the run's ``--precision``)."""
        batch = Collate(self.task, with_targets=False)(items).to(self.device)
        with autocast(self.device, self.record.config.precision):
            return self.task.predict(self.head, batch)

    def run(self, inputs: Iterable[Input], image_ids: dict[str, int] | None = None, on_error: OnError | None = None
            ) -> Iterator[tuple[Sample, Any]]:  # fmt: skip
        """(sample, the task's prediction) of every input, heads run on batches of ``batch_size`` samples; inputs that
        cannot be used go to ``on_error`` (see :meth:`samples`)."""
        self.head.eval()
        group: list[Sample] = []
        for s in self.samples(inputs, on_error):
            group.append(s)
            if len(group) == self.batch_size:
                yield from self._run_group(group, image_ids)
                group = []
        if group:
            yield from self._run_group(group, image_ids)

    def _run_group(self, group: list[Sample], image_ids: dict[str, int] | None) -> Iterator[tuple[Sample, Any]]:
        ids = image_ids or {}
        items: list[Mapping[str, Any]] = [self.item(s, image_id=ids.get(Path(s.name).name)) for s in group]
        yield from zip(group, self.predict_items(items), strict=True)

    def forward(self, inputs: Input | Sequence[Input]) -> Any:
        """The user-facing prediction of one input, or a list of them for a list (or a batch array) of inputs (see the
        class docstring)."""
        if self.single(inputs):
            return self.forward([inputs])[0]
        return [self.present(s, p) for s, p in self.run(inputs)]

    @property
    def options(self) -> OutputOptions:
        return OutputOptions(score_thr=self.score_thr, top_k=self.top_k)

    def present(self, s: Sample, p: Any) -> Any:
        """A task prediction as ``model(inputs)`` returns it."""
        return self.task_def.outputs.present(self.task, p, self.options)


def backbone_device(backbone: Backbone) -> torch.device:
    return next(backbone.model.parameters()).device


def inference_manifest(backbone: Any, pre: Preprocessing, dataset: Any, test_views: tuple[str, ...], clips: int | None,
                       crops: int | None) -> Manifest:  # fmt: skip
    """The manifest of a store of these inputs: the run's backbone and normalisation, the plain view (no training
    jitter) and the test views asked for; video: the run's frames per clip, ``clips`` x ``crops`` views."""
    video = pre.frames is not None
    views = dataclasses.replace(pre, views=1, view_scale=(1.0, 1.0), view_flip=False, test_views=() if video else test_views)
    if video:
        views = dataclasses.replace(views, clips=clips or pre.clips, crops=crops or pre.crops)
    elif clips or crops:
        raise InputError("--clips and --crops are for video heads")
    if min(views.clips, views.crops) < 1:
        raise InputError("--clips and --crops must be at least 1")
    return Manifest(backbone=backbone, preprocessing=views, storage=StorageSpec(dtype="fp32", codec="none"), dataset=dataset)


def load(run: str | Path, *, weights: str = "", random_init: bool = False, device: str = "auto", **kw: Any) -> TrainedModel:
    """``fcache.load(RUN)``: the run's frozen backbone + trained head as one ``nn.Module`` (see :class:`TrainedModel`)."""
    return TrainedModel.from_run(run, weights=weights, random_init=random_init, device=device, **kw)
