"""What the dense-target sources (``ade20k``, ``seg-folder``, ``depth-folder``) share: images paired by stem with
single-channel label maps, listed from headers only, decoded into one target map per sample.

A subclass names its folders and classes and turns a label file's values into the target's (``to_target``: class
indices, or metres). The target (``segmentation`` by default) is (Hmax, Wmax) per sample, padded with its fill
(``Targets.IGNORE``); Hmax/Wmax come from the label and image headers read in ``samples()`` (no pixel is decoded there).
Keys are image paths relative to ``--root``, sorted.

EXIF orientation never desynchronises image and label: label PNGs carry no orientation, so a label the size of the
stored image pixels is transposed exactly like the image (both end upright); a label already the size of the
oriented image is kept as is; any other size is SIZE_MISMATCH. A label file that is empty, not a PNG or too large
costs its sample (its status), never the dataset.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fcache.common.errors import InputError, MetadataError
from fcache.extract.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    exif_orientation,
    load_image,
    opened_formats,
    orient,
    oriented_size,
    to_rgb,
)
from fcache.extract.sources.base import Decoded, SampleError, SampleRef
from fcache.spec import Status, Targets
from fcache.store import TargetSpec

log = logging.getLogger(__name__)

LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")  # single-channel: palette PNGs read as indices


def header(path: Path, formats: tuple[str, ...]) -> tuple[tuple[int, int], int]:
    """(w, h) and EXIF orientation from a file's header, without decoding pixels."""
    with warnings.catch_warnings():  # sizes are checked against --max-pixels by the caller
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path, formats=formats) as im:
            return im.size, exif_orientation(im)


def check_split(split: str, labels: str) -> None:
    """``--split`` names a sub-folder (of images/ and ``labels``/), not a path."""
    if split and (Path(split).name != split or split in (".", "..")):
        raise InputError(f"--split {split!r} must name a sub-folder of images/ and {labels}/ (e.g. train), not a path")


def split_folders(root: Path, split: str, labels: str, layout: str) -> tuple[Path, Path]:
    """(images folder, label folder) of ``ROOT/images[/SPLIT]`` + ``ROOT/<labels>[/SPLIT]``; InputError naming the
    ``layout`` and the splits there are when they are not there (or only splits are, and no ``--split`` was given)."""
    sub = Path(split) if split else Path()
    images, maps = root / "images" / sub, root / labels / sub
    top = root / "images"
    splits = sorted(p.name for p in top.iterdir() if p.is_dir() and (root / labels / p.name).is_dir()) if top.is_dir() else []
    only_splits = not split and splits and not any(p.is_file() for p in top.iterdir())
    if not images.is_dir() or not maps.is_dir() or only_splits:
        found = f"; splits found: {', '.join(splits)} (--split NAME)" if splits and not split else ""
        raise InputError(
            f"--root {root}{f' --split {split}' if split else ''}: expected folders {images.relative_to(root)} "
            f"and {maps.relative_to(root)} ({layout}){found}"
        )
    return images, maps


class LabelMapSource:
    """Images and label PNGs of the same stem; subclasses set ``kind``, the folders, the classes and ``to_target``."""

    kind = ""
    task = "segmentation"
    labels_name = "label map"  # what a label file is called in messages
    strict_pairs = False  # True: a label file without its image is a metadata problem (else a warning)
    label_suffixes: tuple[str, ...] = (".png",)  # what a label file may end with
    target: str = Targets.SEGMENTATION  # the stored map: its name, dtype and padding
    target_dtype: str = "uint8"
    target_fill: float = Targets.IGNORE

    def __init__(self, root: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(os.path.abspath(root))
        self.max_pixels = max_pixels
        self.hw: tuple[int, int] | None = None  # (Hmax, Wmax) of the label maps, known after samples()
        self._refs: list[SampleRef] | None = None

    # -- what a subclass says ----------------------------------------------------------------------
    def folders(self) -> tuple[Path, Path]:
        """(images folder, label folder); InputError naming the expected layout when they are not there."""
        raise NotImplementedError

    def label_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def to_target(self, values: np.ndarray, ref: SampleRef) -> np.ndarray:
        """(h, w) target values from a label file's (segmentation: uint8 class indices, ``Targets.IGNORE`` where
        unlabelled); SampleError if bad."""
        raise NotImplementedError

    def label_size(self, path: Path) -> tuple[int, int]:
        """(w, h) of a label file from its header (raises when it is not one)."""
        return header(path, ("PNG",))[0]

    def open_label(self, ref: SampleRef) -> Image.Image:
        """The sample's label file as a single-channel image (SampleError with the sample's status when it is not one)."""
        label_im, _ = load_image(ref.extra["label"], root=self.root, max_pixels=self.max_pixels)
        if label_im.mode not in LABEL_MODES:
            raise SampleError(
                Status.DECODE_ERROR, f"{ref.extra['label']}: a {self.labels_name} must be single-channel (L or P), not {label_im.mode}"
            )
        return label_im

    # -- listing -----------------------------------------------------------------------------------
    def samples(self) -> list[SampleRef]:
        if self._refs is not None:
            return self._refs
        images_dir, labels_dir = self.folders()
        images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
        labels = {p.stem: p for p in labels_dir.iterdir() if p.is_file() and p.suffix.lower() in self.label_suffixes}
        problems, refs, sizes = [], [], []
        seen: dict[str, Path] = {}
        for path in images:
            if path.stem in seen:
                problems.append(f"{path.relative_to(self.root)} and {seen[path.stem]} share the name {path.stem!r}; rename one")
                continue
            seen[path.stem] = path.relative_to(self.root)
            label = labels.pop(path.stem, None)
            if label is None:
                wanted = f"{labels_dir.relative_to(self.root)}/{path.stem}{'|'.join(self.label_suffixes)}"
                problems.append(f"{path.relative_to(self.root)}: no {self.labels_name} {wanted}")
                continue
            extra: dict[str, Any] = {"label": str(label)}
            try:
                label_wh = self.label_size(label)
            except Exception as e:  # an empty, cut, non-PNG or bomb-sized label costs its sample, not the dataset
                status = Status.EMPTY_FILE if label.stat().st_size == 0 else Status.DECODE_ERROR
                status = Status.TOO_LARGE if isinstance(e, Image.DecompressionBombError) else status
                extra |= {"label_status": int(status), "label_error": f"{label}: {type(e).__name__}"}
            else:
                if label_wh[0] * label_wh[1] <= self.max_pixels:  # a too large label is refused at decode: it sizes nothing
                    sizes.append(self._label_hw(path, label_wh))
            refs.append(SampleRef(key=path.relative_to(self.root).as_posix(), path=str(path), extra=extra))
        if not images:
            problems.append(f"no images in {images_dir}")
        if labels and self.strict_pairs:
            shown = ", ".join(p.name for p in list(labels.values())[:5]) + (" ..." if len(labels) > 5 else "")
            problems.append(f"{len(labels)} {self.labels_name}(s) in {labels_dir.relative_to(self.root)} have no image ({shown})")
        if problems:
            raise MetadataError(f"{self.kind} {self.root}", problems, hint="fix the dataset folder")
        if labels:
            log.warning("%s: %d label map(s) without an image are ignored (e.g. %s)", self.kind, len(labels), next(iter(labels.values())))
        self.hw = (max((h for h, _ in sizes), default=1), max((w for _, w in sizes), default=1))
        self._refs = refs
        return refs

    @staticmethod
    def _label_hw(image: Path, label_wh: tuple[int, int]) -> tuple[int, int]:
        """(h, w) the label map will have once oriented with its image (the image's header decides)."""
        try:
            image_wh, orientation = header(image, opened_formats())
        except Exception:
            return label_wh[1], label_wh[0]  # an unreadable image gets its status at decode time
        w, h = oriented_size(label_wh, orientation) if label_wh == image_wh else label_wh
        return h, w

    # -- the store's targets -----------------------------------------------------------------------
    def target_specs(self) -> dict[str, TargetSpec]:
        if self.hw is None:
            self.samples()
        assert self.hw is not None
        return {self.target: TargetSpec(self.target_dtype, self.hw, fill=self.target_fill)}

    def target_attrs(self) -> dict[str, Any]:
        return {}

    def driver_targets(self, refs: list[SampleRef]) -> dict[str, np.ndarray]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_refs": None}

    # -- decoding ----------------------------------------------------------------------------------
    def decode(self, ref: SampleRef) -> Decoded:
        if self.hw is None:
            self.samples()
        assert self.hw is not None
        if "label_status" in ref.extra:
            what = {Status.EMPTY_FILE: "is empty (0 bytes)", Status.TOO_LARGE: "is too large"}.get(
                ref.extra["label_status"], f"is not a {' or '.join(x.lstrip('.').upper() for x in self.label_suffixes)} file"
            )
            raise SampleError(Status(ref.extra["label_status"]), f"{ref.key}: its {self.labels_name} {what} ({ref.extra['label_error']})")
        im, orientation = load_image(ref.path, root=self.root, max_pixels=self.max_pixels)
        label_im = self.open_label(ref)
        oriented = oriented_size(im.size, orientation)
        if label_im.size == im.size:
            label_im = orient(label_im, orientation)
        elif label_im.size != oriented:
            raise SampleError(
                Status.SIZE_MISMATCH,
                f"{ref.key}: the image is {oriented[0]}x{oriented[1]}, its {self.labels_name} {label_im.size[0]}x{label_im.size[1]}",
            )
        label = self.to_target(np.asarray(label_im), ref)  # (h, w)
        hmax, wmax = self.hw
        h, w = label.shape
        if h > hmax or w > wmax:
            raise SampleError(
                Status.SIZE_MISMATCH, f"{ref.key}: {self.labels_name} {w}x{h} exceeds {wmax}x{hmax} (files changed since listing?)"
            )
        padded = np.full((hmax, wmax), self.target_fill, dtype=self.target_dtype)
        padded[:h, :w] = label
        return Decoded(image=to_rgb(im, orientation, name=ref.path), orientation=orientation, targets={self.target: padded})
