"""The ``ade20k`` source: ADEChallengeData2016 (SceneParsing, 150 classes) as laid out by the MIT release.

``--root`` holds ``images/<split>/*.jpg`` and ``annotations/<split>/*.png`` (split ``training`` or ``validation``);
an image's label map is the PNG of the same stem. Labels follow mmsegmentation's ``reduce_zero_label``: 0 (other)
-> 255 (ignore), k -> k - 1 for k in 1..150; values above 150 are ignored too. The ``segmentation`` target is
(Hmax, Wmax) uint8 per sample, padded with 255; Hmax/Wmax come from the PNG and JPEG headers read in ``samples()``
(no pixel is decoded there). Keys are image paths relative to ``--root``, sorted.

EXIF orientation never desynchronises image and label: label PNGs carry no orientation, so a label the size of the
stored image pixels is transposed exactly like the image (both end upright); a label already the size of the
oriented image is kept as is; any other size is SIZE_MISMATCH.
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

NUM_CLASSES = 150
# The 150 SceneParsing classes in label order (label k - 1 for PNG value k), as mmsegmentation lists them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")


def reduce_zero_label(values: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> ignore (255), k -> k - 1; values outside 1..num_classes -> ignore. uint8."""
    v = values.astype(np.int64)
    out = v - 1
    out[(v < 1) | (v > num_classes)] = Targets.IGNORE
    return out.astype(np.uint8)


def _header(path: Path, formats: tuple[str, ...]) -> tuple[tuple[int, int], int]:
    """(w, h) and EXIF orientation from a file's header, without decoding pixels."""
    with warnings.catch_warnings():  # sizes are checked against --max-pixels by the caller
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path, formats=formats) as im:
            return im.size, exif_orientation(im)


class Ade20kSource:
    """ADE20K scene parsing: images + 150-class label PNGs; target ``segmentation`` written by workers."""

    kind = "ade20k"
    task = "segmentation"

    def __init__(self, root: str | Path, split: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(os.path.abspath(root))
        self.split = split
        self.max_pixels = max_pixels
        self.hw: tuple[int, int] | None = None  # (Hmax, Wmax) of the label maps, known after samples()
        self._refs: list[SampleRef] | None = None

    def _check_split(self) -> tuple[Path, Path]:
        images, labels = self.root / "images" / self.split, self.root / "annotations" / self.split
        if not self.split or not images.is_dir() or not labels.is_dir():
            have = sorted(p.name for p in (self.root / "images").glob("*") if p.is_dir()) if (self.root / "images").is_dir() else []
            raise InputError(
                f"--root {self.root} --split {self.split!r}: expected folders images/{self.split or '<split>'} and "
                f"annotations/{self.split or '<split>'} (ADEChallengeData2016 layout); splits found: {', '.join(have) or 'none'}"
            )
        return images, labels

    def samples(self) -> list[SampleRef]:
        if self._refs is not None:
            return self._refs
        images_dir, labels_dir = self._check_split()
        images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
        labels = {p.stem: p for p in labels_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        problems, refs, sizes = [], [], []
        for path in images:
            label = labels.pop(path.stem, None)
            if label is None:
                problems.append(f"{path.relative_to(self.root)}: no label map annotations/{self.split}/{path.stem}.png")
                continue
            extra: dict[str, Any] = {"label": str(label)}
            try:
                label_wh, _ = _header(label, ("PNG",))
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
        if problems:
            raise MetadataError(f"ade20k {self.root} ({self.split})", problems, hint="fix the dataset folder")
        if labels:
            log.warning("ade20k: %d label map(s) without an image are ignored (e.g. %s)", len(labels), next(iter(labels.values())))
        self.hw = (max((h for h, _ in sizes), default=1), max((w for _, w in sizes), default=1))
        self._refs = refs
        return refs

    @staticmethod
    def _label_hw(image: Path, label_wh: tuple[int, int]) -> tuple[int, int]:
        """(h, w) the label map will have once oriented with its image (the image's header decides)."""
        try:
            image_wh, orientation = _header(image, opened_formats())
        except Exception:
            return label_wh[1], label_wh[0]  # an unreadable image gets its status at decode time
        w, h = oriented_size(label_wh, orientation) if label_wh == image_wh else label_wh
        return h, w

    def label_names(self) -> tuple[str, ...]:
        return ADE20K_CLASSES

    def target_specs(self) -> dict[str, TargetSpec]:
        if self.hw is None:
            self.samples()
        assert self.hw is not None
        return {Targets.SEGMENTATION: TargetSpec("uint8", self.hw, fill=Targets.IGNORE)}

    def target_attrs(self) -> dict[str, Any]:
        return {}

    def driver_targets(self, refs: list[SampleRef]) -> dict[str, np.ndarray]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_refs": None}

    def decode(self, ref: SampleRef) -> Decoded:
        if self.hw is None:
            self.samples()
        assert self.hw is not None
        if "label_status" in ref.extra:
            what = {Status.EMPTY_FILE: "is empty (0 bytes)", Status.TOO_LARGE: "is too large"}.get(
                ref.extra["label_status"], "is not a PNG"
            )
            raise SampleError(Status(ref.extra["label_status"]), f"{ref.key}: its label map {what} ({ref.extra['label_error']})")
        im, orientation = load_image(ref.path, root=self.root, max_pixels=self.max_pixels)
        label_im, _ = load_image(ref.extra["label"], root=self.root, max_pixels=self.max_pixels)
        if label_im.mode not in LABEL_MODES:
            raise SampleError(
                Status.DECODE_ERROR, f"{ref.extra['label']}: a label map must be single-channel (L or P), not {label_im.mode}"
            )
        oriented = oriented_size(im.size, orientation)
        if label_im.size == im.size:
            label_im = orient(label_im, orientation)
        elif label_im.size != oriented:
            raise SampleError(
                Status.SIZE_MISMATCH,
                f"{ref.key}: the image is {oriented[0]}x{oriented[1]}, its label map {label_im.size[0]}x{label_im.size[1]}",
            )
        label = reduce_zero_label(np.asarray(label_im))  # (h, w)
        hmax, wmax = self.hw
        h, w = label.shape
        if h > hmax or w > wmax:
            raise SampleError(Status.SIZE_MISMATCH, f"{ref.key}: label map {w}x{h} exceeds {wmax}x{hmax} (files changed since listing?)")
        padded = np.full((hmax, wmax), Targets.IGNORE, dtype=np.uint8)
        padded[:h, :w] = label
        return Decoded(image=to_rgb(im, orientation, name=ref.path), orientation=orientation, targets={Targets.SEGMENTATION: padded})
