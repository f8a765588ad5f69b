"""The shared vocabulary of fcache: level specs, view geometry and the store manifest.

Everything written to disk is a frozen dataclass read and written from its type hints (``fcache.common.records.Record``);
the manifest is format version 1, and ``MANIFEST_FORMAT`` migrates the layouts earlier releases wrote within it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from fcache._version import __version__
from fcache.common.errors import StoreError
from fcache.common.flags import check_flags, flag, required
from fcache.common.records import Document, Format, Migration, Record, fill, to_dict

FORMAT_VERSION = 1

LEVEL_NAMES = {4: "p2", 8: "p3", 16: "p4", 32: "p5", 64: "p6"}


def level_name(stride: int) -> str:
    """FPN name of a feature level of the given stride (4 -> p2 ... 32 -> p5)."""
    if stride not in LEVEL_NAMES:
        raise ValueError(f"no level name for stride {stride}; strides must be one of {sorted(LEVEL_NAMES)}")
    return LEVEL_NAMES[stride]


class Status(IntEnum):
    """Per-sample extraction status, stored as uint8 in ``samples/status``."""

    PENDING = 0
    OK = 1
    EMPTY_FILE = 2
    TRUNCATED = 3
    DECODE_ERROR = 4
    TOO_LARGE = 5
    SIZE_MISMATCH = 6
    VIDEO_PARTIAL = 7
    TIMEOUT = 8
    OUTSIDE_ROOT = 9

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def has_features(self) -> bool:
        """OK, or a video that decoded only in part (its clips were formed from the frames that did)."""
        return self in (Status.OK, Status.VIDEO_PARTIAL)


@dataclass(frozen=True)
class LevelSpec(Record):
    """One stored feature level: its name (p2..p5), channel count and stride in input pixels."""

    name: str
    channels: int
    stride: int

    def size(self, input_size: int) -> int:
        """Side of this level's square feature map for a square canvas of ``input_size``."""
        return math.ceil(input_size / self.stride)


GEOMETRY_FIELDS = (
    "orig_h",  # original image height, after EXIF orientation
    "orig_w",
    "scale",  # resize factor original -> resized image
    "crop_x0",  # top-left of the crop in resized-image pixels
    "crop_y0",
    "valid_w",  # width of image content on the canvas (content starts at 0,0)
    "valid_h",
    "flip",  # 1 when the view is mirrored horizontally
    "canvas",  # side of the square padded canvas given to the backbone
    "orientation",  # EXIF orientation that was applied (1 = none)
    "t_start",  # video: clip start / end in seconds (0 for images)
    "t_end",
)


@dataclass(frozen=True)
class Geometry(Record):
    """How one view was cut from its sample: original -> resized -> cropped -> flipped -> padded.

    A point (x, y) of the original image lands on the canvas at
    ``x' = x * scale - crop_x0`` (then ``valid_w - x'`` when flipped), ``y' = y * scale - crop_y0``.
    Content occupies ``[0, valid_w) x [0, valid_h)`` of the square ``canvas``; the rest is padding.
    """

    orig_h: float
    orig_w: float
    scale: float
    crop_x0: float = 0.0
    crop_y0: float = 0.0
    valid_w: float = 0.0
    valid_h: float = 0.0
    flip: float = 0.0
    canvas: float = 0.0
    orientation: float = 1.0
    t_start: float = 0.0
    t_end: float = 0.0

    def to_array(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in GEOMETRY_FIELDS], dtype=np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> Geometry:
        if len(a) != len(GEOMETRY_FIELDS):
            raise ValueError(f"geometry vector has {len(a)} fields, expected {len(GEOMETRY_FIELDS)}")
        return cls(**{f: float(v) for f, v in zip(GEOMETRY_FIELDS, a, strict=True)})

    def boxes_to_view(self, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Map xyxy boxes (..., 4) from original-image to canvas coordinates."""
        b = np.asarray(boxes, dtype=np.float64).copy()
        b[..., [0, 2]] = b[..., [0, 2]] * self.scale - self.crop_x0
        b[..., [1, 3]] = b[..., [1, 3]] * self.scale - self.crop_y0
        if clip:
            b[..., [0, 2]] = b[..., [0, 2]].clip(0, self.valid_w)
            b[..., [1, 3]] = b[..., [1, 3]].clip(0, self.valid_h)
        if self.flip:
            b[..., [0, 2]] = self.valid_w - b[..., [2, 0]]
        return b

    def boxes_from_view(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes (..., 4) from canvas back to original-image coordinates."""
        b = np.asarray(boxes, dtype=np.float64).copy()
        if self.flip:
            b[..., [0, 2]] = self.valid_w - b[..., [2, 0]]
        b[..., [0, 2]] = (b[..., [0, 2]] + self.crop_x0) / self.scale
        b[..., [1, 3]] = (b[..., [1, 3]] + self.crop_y0) / self.scale
        b[..., [0, 2]] = b[..., [0, 2]].clip(0, self.orig_w)
        b[..., [1, 3]] = b[..., [1, 3]].clip(0, self.orig_h)
        return b

    def points_to_view(self, xy: np.ndarray) -> np.ndarray:
        """Map points (..., 2) from original-image to canvas coordinates (unclipped)."""
        p = np.asarray(xy, dtype=np.float64).copy()
        p[..., 0] = p[..., 0] * self.scale - self.crop_x0
        p[..., 1] = p[..., 1] * self.scale - self.crop_y0
        if self.flip:
            p[..., 0] = self.valid_w - p[..., 0]
        return p


class Targets:
    """Names under ``targets/`` and their meaning: the contract between sources (extract) and heads.

    - ``image``: [N] str, JSON of the sample's record (COCO: its ``images[]`` entry).
    - ``annotations``: [N] str, JSON list of the sample's COCO annotations (bbox xywh, segmentation
      as polygons or RLE, area, iscrowd, category_id) in original-image coordinates (after EXIF).
    - ``label``: [N] int64 class index into ``DatasetInfo.label_names`` (-1: unlabelled).
    - ``segmentation``: [N, Hmax, Wmax] uint8 label map at original resolution, classes 0..K-1
      (ADE20K after reduce-zero-label), ``IGNORE`` for unlabelled pixels and for the padding beyond
      (orig_h, orig_w) of the sample's geometry.
    - ``stuff``: [N, Hmax, Wmax] uint8 COCO-stuff label map at original resolution (``--stuff-root``), values
      0..STUFF_CLASSES-1, ``IGNORE`` for unlabelled pixels, values >= STUFF_CLASSES and the padding; HTC's semantic branch.
    - ``depth``: [N, Hmax, Wmax] float32 depth map in metres at original resolution (``depth-folder``), 0 for invalid
      pixels (no measurement) and for the padding beyond (orig_h, orig_w) of the sample's geometry.
    Group attrs of ``targets/``: ``categories`` (the COCO categories list) for detection stores.
    """

    IMAGE = "image"
    ANNOTATIONS = "annotations"
    LABEL = "label"
    SEGMENTATION = "segmentation"
    STUFF = "stuff"
    DEPTH = "depth"
    IGNORE = 255


STUFF_CLASSES = 183  # COCO-stuff label values 0..182, the class count of mmdetection's HTC semantic head


@dataclass(frozen=True)
class BackboneInfo(Record):
    """The frozen base network whose features are stored."""

    alias: str
    timm_name: str
    weights: str  # sha256 of the weights file or timm tag, or "random-init"
    input_size: int
    window: int | None
    levels: tuple[LevelSpec, ...]


@dataclass(frozen=True)
class Preprocessing(Record):
    """How samples become backbone inputs (see ``Geometry``)."""

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: str = "longest-side+pad"
    views: int = 1  # training views per sample: 1 = the plain resize+pad, K > 1 = K random jittered views
    view_scale: tuple[float, float] = (1.0, 1.0)
    view_flip: bool = False
    test_views: tuple[str, ...] = ()
    seed: int = 0
    frames: int | None = None  # video: frames per clip
    clips: int = 1  # video: temporal clips per sample
    crops: int = 1  # video: spatial crops per clip


@dataclass(frozen=True)
class StorageSpec(Record):
    """How feature bytes are laid out: the stored form of each level, codec and shard size along N.

    ``dtype`` is the form of every level not named in ``forms`` (a row of ``fcache.store.dtypes.DTYPES`` each);
    ``max_error`` the relative RMSE budget the forms were chosen for (``--max-error``), and ``measured`` what the
    choice measured per level on the first unit (``rel_rmse``, ``bits`` per stored value with side data).
    """

    dtype: str = "fp16"  # fp16 | bf16 | int8 | fp32 | the compact forms of fcache.store.dtypes
    codec: str = "zstd"  # zstd | zstd:LEVEL | lz4 | none
    shard_size: int = 16
    forms: dict[str, str] = field(default_factory=dict)  # level -> form, where it differs from dtype
    max_error: float | None = None
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # level -> {"rel_rmse": ..., "bits": ...}

    def form(self, level: str) -> str:
        """The stored form of ``level``."""
        return self.forms.get(level, self.dtype)


DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default MAX_IMAGE_PIXELS (~ 9459 x 9459)


@dataclass(frozen=True)
class SourceConfig(Record):
    """Where a store's samples come from and how they are listed and decoded: everything needed to rebuild the source.

    Built from the ``fcache extract`` flags, recorded in the manifest (``dataset.source``), passed whole to
    ``fcache.extract.sources.build_source``; ``verify --recompute``, the frozen-online setting and ``fcache bench``
    rebuild the source from it alone.
    """

    kind: str = required("Kind of raw dataset.", name="--dataset", choices="fcache.extract.sources:SOURCES")
    root: str = required(
        "Image folder (coco, folder), ADEChallengeData2016 folder (ade20k), images/ + masks/ folder (seg-folder), "
        "images/ + depth/ folder (depth-folder), class folders (video), tar folder (wds)."
    )
    annotations: str = flag("", "COCO json (coco) or path,label CSV (video).", show_default=False)
    split: str = flag(
        "",
        "ade20k: training or validation; seg-folder, depth-folder: the sub-folder of images/ and masks/ or depth/ (optional).",
        show_default=False,
    )
    frames: int = flag(16, "video: frames per clip.", min=1, max=4096)
    clips: int = flag(1, "video: temporal clips per video.", min=1, max=256)
    crops: int = flag(1, "video: spatial crops per clip (1 or 3).", min=1, max=16)
    classes: str = flag(
        "",
        "folder, video, wds, seg-folder: class names in label order, comma-separated or a file with one per line "
        "(seg-folder: default ROOT/classes.txt).",
        show_default=False,
    )
    ignore_index: int = flag(255, "seg-folder: the mask value of unlabelled pixels (stored as 255).", min=0, max=65535)
    max_pixels: int = flag(DEFAULT_MAX_PIXELS, "Larger images are refused as too_large (decompression bombs).", min=1)
    decode_timeout: float = flag(60.0, "Seconds one sample may take to decode.", above=0, max=86400)
    stuff_root: str = flag(
        "", "coco: folder of COCO-stuff label PNGs named like the images (.png), for HTC's semantic branch.", show_default=False
    )
    drop_degenerate_boxes: bool = flag(
        False, "coco: drop boxes with w or h <= 0 (with a warning) instead of refusing the json.", show_default=False
    )
    depth_scale: float = flag(
        0.0, "depth-folder: depth units per metre [default: 1000 for PNG (millimetres), 1 for .npy (metres)].", show_default=False, min=0
    )

    def __post_init__(self) -> None:
        check_flags(self)

    @property
    def video(self) -> bool:
        return self.kind == "video"


@dataclass(frozen=True)
class DatasetInfo(Record):
    """Which samples the store holds and the source they came from (``source.root``/``annotations`` are informative)."""

    source: SourceConfig
    n: int
    digest: str  # sha256 of the ordered sample keys
    task: str = ""  # detection | segmentation | depth | video | classification | "" (the source's task)
    label_names: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.source.kind  # coco | ade20k | seg-folder | video | folder | wds | synthetic

    @property
    def split(self) -> str:
        return self.source.split

    @property
    def root(self) -> str:
        return self.source.root


def source_recorded_whole(dataset: Any, preprocessing: Any) -> Any:
    """A dataset record written before its source was recorded whole: its ``kind``, ``root``, ``annotations`` and
    ``split`` (and, for a video store, the sampling then kept in ``preprocessing`` only) become ``dataset.source``."""
    if not isinstance(dataset, dict) or "source" in dataset:
        return dataset
    source = {k: dataset.get(k, "") for k in ("kind", "root", "annotations", "split")}
    if isinstance(preprocessing, dict) and preprocessing.get("frames") is not None:
        source |= {k: preprocessing[k] for k in ("frames", "clips", "crops") if k in preprocessing}
    return {**dataset, "source": source}


def _manifest_source(d: Document) -> Document:
    dataset = source_recorded_whole(d.get("dataset"), d.get("preprocessing"))
    return d if dataset is d.get("dataset") else {**d, "dataset": dataset}


# The manifest's format: version 1, read as every earlier release of it was written (oldest first).
MANIFEST_FORMAT = Format(
    FORMAT_VERSION,
    refused="store format version {version} is not supported (this fcache reads version {current}); "
    "re-extract the store with this fcache version",
    oldest=FORMAT_VERSION,
    missing=0,
    migrations=(
        Migration(1, fill(fcache_version="", libraries={})),  # provenance not recorded: unknown, not this fcache's
        Migration(1, _manifest_source),  # dataset.source recorded whole
    ),
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a store's bytes (provenance, not fingerprinted)."""
    out = {}
    for name in ("torch", "timm", "zarr", "numcodecs", "numpy", "pillow", "av"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def keys_digest(keys: list[str]) -> str:
    """sha256 of an ordered list of sample keys."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# What a store's fingerprint hashes: an explicit list of fields per part of the manifest, each with its rule.
#   ALWAYS: hashed as it is: the fields of format 1 as first released, whose stores' fingerprints must never change;
#   WHEN_SET: hashed only when it differs from its default: every field added since, so that adding a setting never
#             changes the fingerprint of an existing store (its stores keep resuming, their eval folders keep their names);
#   NEVER: where things were and how long decoding may take, not what the bytes are (the video sampling settings of
#          the source are fingerprinted once, in ``preprocessing``);
#   GIVEN: hashed as ``{name}: true`` when given (``stuff_root``: whether the store has stuff maps, not where they were).
# A new field of a fingerprinted record gets a WHEN_SET (or NEVER) row here; tests/test_spec.py fails while it has none.
ALWAYS, WHEN_SET, NEVER = "always", "when-set", "never"
GIVEN = ("given", "stuff")
FINGERPRINT: dict[str, Any] = {
    "format_version": ALWAYS,
    **dict.fromkeys(("fcache_version", "libraries"), NEVER),  # provenance
    "backbone": {
        **dict.fromkeys(("alias", "timm_name", "weights", "input_size", "window"), ALWAYS),
        "levels": dict.fromkeys(("name", "channels", "stride"), ALWAYS),
    },
    "preprocessing": dict.fromkeys(
        ("mean", "std", "resize", "views", "view_scale", "view_flip", "test_views", "seed", "frames", "clips", "crops"), ALWAYS
    ),
    "storage": {
        **dict.fromkeys(("dtype", "codec", "shard_size"), ALWAYS),
        **dict.fromkeys(("forms", "max_error"), WHEN_SET),
        "measured": NEVER,  # what the choice measured, not what the bytes are
    },
    "dataset": {
        **dict.fromkeys(("n", "digest", "task", "label_names"), ALWAYS),
        "source": {
            **dict.fromkeys(("kind", "split", "classes", "max_pixels", "drop_degenerate_boxes"), ALWAYS),
            **dict.fromkeys(("root", "annotations", "decode_timeout", "frames", "clips", "crops"), NEVER),
            **dict.fromkeys(("ignore_index", "depth_scale"), WHEN_SET),
            "stuff_root": GIVEN,
        },
    },
}


def fingerprinted(record: Any, rules: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The part of a dataclass ``record`` its fingerprint hashes, as JSON values, following ``rules`` (see FINGERPRINT)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        rule = rules.get(f.name)
        if rule is None:
            raise AssertionError(f"{where}{f.name} has no fingerprint rule: give it one in fcache.spec.FINGERPRINT")
        value = getattr(record, f.name)
        if rule == NEVER or (rule == WHEN_SET and value == _default(f)):
            continue
        if rule == GIVEN:
            if value:
                out[GIVEN[1]] = True
        elif isinstance(rule, dict):
            nested = [fingerprinted(v, rule, f"{where}{f.name}.") for v in value] if isinstance(value, tuple | list) else None
            out[f.name] = nested if nested is not None else fingerprinted(value, rule, f"{where}{f.name}.")
        else:
            out[f.name] = _json_value(value)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _json_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _json_value(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, tuple | list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class Manifest(Record):
    """``attrs["fcache"]`` of a store: everything that decides its bytes, plus provenance (and, written beside them,
    the fingerprint)."""

    FORMAT = MANIFEST_FORMAT
    ERROR = StoreError
    DAMAGED = "the store was edited or damaged"

    backbone: BackboneInfo
    preprocessing: Preprocessing
    storage: StorageSpec
    dataset: DatasetInfo
    format_version: int = FORMAT_VERSION
    fcache_version: str = __version__
    libraries: dict[str, str] = field(default_factory=library_versions)

    @property
    def video(self) -> bool:
        return self.preprocessing.frames is not None

    @property
    def num_views(self) -> int:
        p = self.preprocessing
        if self.video:
            return p.clips * p.crops
        return p.views + len(p.test_views)

    @property
    def view_names(self) -> tuple[str, ...]:
        """Name of each view index: ``train0..`` (or ``plain`` when there is one), then the test views."""
        if self.video:
            p = self.preprocessing
            return tuple(f"clip{c}-crop{k}" for c in range(p.clips) for k in range(p.crops))
        train = ("plain",) if self.preprocessing.views == 1 else tuple(f"train{k}" for k in range(self.preprocessing.views))
        return train + tuple(self.preprocessing.test_views)

    @property
    def train_views(self) -> tuple[int, ...]:
        """View indices a trainer samples from: the K training views (video: every clip x crop)."""
        return tuple(range(self.num_views if self.video else self.preprocessing.views))

    @property
    def levels(self) -> tuple[LevelSpec, ...]:
        return self.backbone.levels

    def level(self, name: str) -> LevelSpec:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(f"level {name!r} is not in this store (it has {', '.join(lv.name for lv in self.levels)})")

    def level_shape(self, name: str) -> tuple[int, ...]:
        """Per sample-view shape of a level: (C, H, W), or (T, C, H, W) for video."""
        lv = self.level(name)
        s = lv.size(self.backbone.input_size)
        chw = (lv.channels, s, s)
        return (int(self.preprocessing.frames or 0), *chw) if self.video else chw

    def fingerprinted(self) -> dict[str, Any]:
        """What the fingerprint hashes: the fields of ``FINGERPRINT`` by their rules."""
        return fingerprinted(self, FINGERPRINT)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprinted(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def differences(self, other: Manifest) -> list[str]:
        """Dotted names of fingerprinted fields that differ, with both values."""
        return _diff(self.fingerprinted(), other.fingerprinted(), "")

    def to_dict(self) -> dict[str, Any]:
        return {**to_dict(self), "fingerprint": self.fingerprint}

    @classmethod
    def read(cls, d: Any, where: str) -> Manifest:
        """A manifest read from a store: migrated and checked field by field first (StoreError naming ``where`` and the field)."""
        return cls.from_dict(d, where)


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: {json.dumps(a)} != {json.dumps(b)}"]
