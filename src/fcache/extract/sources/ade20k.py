"""The ``ade20k`` source: ADEChallengeData2016 (SceneParsing, 150 classes) as laid out by the MIT release.

``--root`` holds ``images/<split>/*.jpg`` and ``annotations/<split>/*.png`` (split ``training`` or ``validation``);
an image's label map is the PNG of the same stem. Labels follow mmsegmentation's ``reduce_zero_label``: 0 (other)
-> 255 (ignore), k -> k - 1 for k in 1..150; values above 150 are ignored too. Listing, padding, orientation and bad
label files as every label-map source (``labelmap.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcache.common.errors import InputError
from fcache.extract.decode import DEFAULT_MAX_PIXELS
from fcache.extract.sources.base import SampleRef
from fcache.extract.sources.labelmap import LabelMapSource
from fcache.spec import Targets

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


def reduce_zero_label(values: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> ignore (255), k -> k - 1; values outside 1..num_classes -> ignore. uint8."""
    v = values.astype(np.int64)
    out = v - 1
    out[(v < 1) | (v > num_classes)] = Targets.IGNORE
    return out.astype(np.uint8)


class Ade20kSource(LabelMapSource):
    """ADE20K scene parsing: images + 150-class label PNGs; target ``segmentation`` written by workers."""

    kind = "ade20k"

    def __init__(self, root: str | Path, split: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, max_pixels=max_pixels)
        self.split = split

    def folders(self) -> tuple[Path, Path]:
        images, labels = self.root / "images" / self.split, self.root / "annotations" / self.split
        if not self.split or not images.is_dir() or not labels.is_dir():
            have = sorted(p.name for p in (self.root / "images").glob("*") if p.is_dir()) if (self.root / "images").is_dir() else []
            raise InputError(
                f"--root {self.root} --split {self.split!r}: expected folders images/{self.split or '<split>'} and "
                f"annotations/{self.split or '<split>'} (ADEChallengeData2016 layout); splits found: {', '.join(have) or 'none'}"
            )
        return images, labels

    def label_names(self) -> tuple[str, ...]:
        return ADE20K_CLASSES

    def to_target(self, values: np.ndarray, ref: SampleRef) -> np.ndarray:
        return reduce_zero_label(values)
