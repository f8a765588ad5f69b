"""The ``coco`` source: an image folder (``--root``) plus a COCO detection json (``--annotations``).

Follows the COCO data format (https://cocodataset.org/#format-data). ``samples()`` checks the whole json before any
backbone work and reports every problem at once: required fields (images: id, file_name, width, height; annotations:
id, image_id, category_id, bbox; categories: id, name), integer ids, unique image / annotation / category ids,
annotations pointing at existing images and categories, width/height > 0, bbox = 4 finite numbers with w, h > 0
(``drop_degenerate_boxes=True`` drops w or h <= 0 boxes with a logged warning instead), iscrowd in {0, 1},
segmentation a polygon list or an RLE dict whose size is the image's, image files present under ``--root``.

Choices where the format leaves room: samples are ordered by image id, key = ``str(id)``; images without
annotations are samples; a json without ``annotations`` (test-dev) is valid; a missing ``iscrowd`` is stored as 0
and a missing ``area`` as ``w * h`` (pycocotools' evaluation needs both); annotations are stored sorted by id.
A ``file_name`` escaping ``--root`` is not a metadata problem but that sample's status (OUTSIDE_ROOT), as for every
source. EXIF orientation is applied when the oriented size is the json's width x height; when only the stored
(un-oriented) size matches, the annotations are taken to be on the stored pixel grid and the orientation is not
applied (recorded as 1); a size matching neither is SIZE_MISMATCH.

With ``--stuff-root`` (COCO-stuff, for HTC's semantic branch) every image needs ``<stuff-root>/<file_name with .png>``,
checked when listing; it is stored as the ``stuff`` target at original resolution, padded with 255 to the largest
width and height of the json, values >= ``STUFF_CLASSES`` read as 255 (ignored). A map the size of the stored image
pixels is oriented like its image (as ade20k's label maps), one the size of the oriented image is kept as is.

At COCO-train size (118k images, 860k annotations) the check costs little next to parsing the json: polygons are
checked and packed into float arrays while the json is parsed (``_pack``, so the floats of all polygons never exist
as Python objects at once), and the annotations are checked column by column (:func:`fast_annotations`). Only when
that finds something wrong does the entry-by-entry check run, to name every problem.
"""

from __future__ import annotations

import json
import logging
import math
import os
from array import array
from collections import Counter
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from fcache.common.errors import InputError, MetadataError
from fcache.common.records import load_json
from fcache.extract.decode import DEFAULT_MAX_PIXELS, load_image, orient, oriented_size, to_rgb
from fcache.extract.sources.base import Decoded, SampleError, SampleRef
from fcache.extract.sources.labelmap import LABEL_MODES
from fcache.spec import STUFF_CLASSES, Status, Targets
from fcache.store import TargetSpec

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("id", "file_name", "width", "height")
ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")
CATEGORY_FIELDS = ("id", "name")
DEGENERATE = "has w or h <= 0"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _missing(entry: Any, fields: tuple[str, ...], where: str, problems: list[str]) -> bool:
    """Record missing fields / non-object entries; True when the entry is unusable."""
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: not a JSON object")
        return True
    absent = [f for f in fields if f not in entry]
    if absent:
        problems.append(f"{where}: missing field(s) {', '.join(absent)}")
    if "id" in entry and not _is_int(entry["id"]):
        problems.append(f"{where}: id {entry['id']!r} is not an integer")
        return True
    return bool(absent)


def _duplicates(ids: list[int], what: str, problems: list[str]) -> None:
    problems += [f"{what} id {i} appears {n} times" for i, n in sorted(Counter(ids).items()) if n > 1]


def check_categories(categories: Any, problems: list[str]) -> list[dict[str, Any]]:
    """The valid categories; problems appended for the others."""
    if not isinstance(categories, list):
        problems.append("'categories' is missing or not a list")
        return []
    good = [c for k, c in enumerate(categories) if not _missing(c, CATEGORY_FIELDS, f"categories[{k}]", problems)]
    _duplicates([c["id"] for c in good], "category", problems)
    return good


def check_images(images: Any, root: Path, problems: list[str]) -> dict[int, dict[str, Any]]:
    """Images with their required fields, by id; problems appended for bad values, duplicates and missing files."""
    if not isinstance(images, list):
        problems.append("'images' is missing or not a list")
        return {}
    good: dict[int, dict[str, Any]] = {}
    ids = []
    for k, im in enumerate(images):
        where = f"image {im.get('id')}" if isinstance(im, Mapping) and "id" in im else f"images[{k}]"
        if _missing(im, IMAGE_FIELDS, where, problems):
            continue
        ids.append(im["id"])
        good.setdefault(im["id"], im)  # a duplicate is reported below; the first one stays the reference
        bad = [f"{f} {im[f]!r}" for f in ("width", "height") if not (_is_number(im[f]) and im[f] > 0)]
        if bad:
            problems.append(f"{where}: {' and '.join(bad)} must be > 0")
        name = im["file_name"]
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: file_name {name!r} is not a path")
            continue
        path = os.path.normpath(os.path.join(root, name))
        if path.startswith(str(root) + os.sep) and not os.path.isfile(path):
            problems.append(f"{where}: file {name!r} does not exist under {root}")
    _duplicates(ids, "image", problems)
    return good


def check_annotations(
    annotations: Any, images: Mapping[int, Mapping[str, Any]], category_ids: set[int], problems: list[str], *, drop_degenerate: bool
) -> dict[int, list[dict[str, Any]]]:
    """Valid annotations grouped by image id (sorted by id, ``iscrowd`` and ``area`` filled in)."""
    if annotations is None:
        return {}
    if not isinstance(annotations, list):
        problems.append("'annotations' is not a list")
        return {}
    per_image: dict[int, list[dict[str, Any]]] = {}
    ids, dropped = [], 0
    for k, ann in enumerate(annotations):
        where = f"annotation {ann.get('id')}" if isinstance(ann, Mapping) and "id" in ann else f"annotations[{k}]"
        if _missing(ann, ANNOTATION_FIELDS, where, problems):
            continue
        ids.append(ann["id"])
        found: list[str] = []
        degenerate = _check_annotation(ann, images, category_ids, found)
        if degenerate and drop_degenerate and not found:
            dropped += 1
            continue
        if degenerate:
            found.append(f"bbox {ann['bbox']} {DEGENERATE} (w and h must be > 0)")
        if found:
            problems += [f"{where}: {p}" for p in found]
            continue
        w, h = ann["bbox"][2:]
        per_image.setdefault(ann["image_id"], []).append({"iscrowd": 0, "area": float(w * h), **ann})
    _duplicates(ids, "annotation", problems)
    if dropped:
        log.warning("coco: dropped %d annotation(s) whose bbox has w or h <= 0", dropped)
    return {i: sorted(anns, key=lambda a: a["id"]) for i, anns in per_image.items()}


def _check_annotation(ann: Mapping[str, Any], images: Mapping[int, Mapping[str, Any]], category_ids: set[int], found: list[str]) -> bool:
    """Append this annotation's problems to ``found``; True when its box is degenerate (w or h <= 0)."""
    image_id, category_id = ann["image_id"], ann["category_id"]
    image = images.get(image_id) if _is_int(image_id) else None
    if image is None:
        found.append(f"image_id {image_id!r} is not an id in images[]")
    if not (_is_int(category_id) and category_id in category_ids):
        found.append(f"category_id {category_id!r} is not an id in categories[]")
    if ann.get("iscrowd", 0) not in (0, 1):
        found.append(f"iscrowd {ann['iscrowd']!r} must be 0 or 1")
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        found.append(f"area {ann['area']!r} must be a number >= 0")
    seg = ann.get("segmentation")
    if seg is not None:
        problem = segmentation_problem(seg, image)
        if problem:
            found.append(problem)
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        found.append(f"bbox {box!r} must be 4 numbers [x, y, w, h]")
        return False
    return box[2] <= 0 or box[3] <= 0


def segmentation_problem(seg: Any, image: Mapping[str, Any] | None) -> str:
    """What is wrong with a COCO ``segmentation`` ('' when nothing): polygons, or an RLE whose size is the image's and
    whose counts (a list, or COCO's compressed string) are non-negative runs covering exactly h x w pixels."""
    if isinstance(seg, list):
        if all(type(p) is array or (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_number, p))) for p in seg):
            return ""
        return "segmentation polygons must be lists of x0, y0, x1, y1, ... (>= 3 points, numbers)"
    if not isinstance(seg, Mapping):
        return "segmentation must be a list of polygons [x0, y0, x1, y1, ...] or an RLE {counts, size: [h, w]}"
    size = seg.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        return f"segmentation RLE size {size!r} must be [height, width]"
    if image is not None and size != [image["height"], image["width"]]:
        return f"segmentation RLE size {size} is not the image's [height, width] [{image['height']}, {image['width']}]"
    counts = seg.get("counts")
    runs = _rle_runs(counts) if isinstance(counts, str) else counts
    if not (type(runs) is array or (isinstance(runs, list) and all(_is_int(v) and v >= 0 for v in runs))):
        what = "a COCO compressed RLE string" if isinstance(counts, str) else "a list of run lengths (integers >= 0)"
        return f"segmentation RLE counts {str(counts)[:40]!r} are not {what}"
    if sum(runs) != size[0] * size[1]:
        return f"segmentation RLE counts cover {sum(runs)} pixels, not {size[0]} x {size[1]} = {size[0] * size[1]}"
    return ""


def _pack(obj: dict[str, Any]) -> dict[str, Any]:
    """json object hook: a ``segmentation`` whose polygons are all valid (>= 3 points, finite floats) becomes a list of
    float arrays, and an RLE's run lengths (integers >= 0) an integer array: 8 bytes a value instead of a Python object.
    Anything else stays as parsed, for the exact check to judge. ``_plain`` turns the arrays back into JSON lists."""
    seg = obj.get("segmentation")
    if type(seg) is list:
        for p in seg:  # a loop, not all(...): this runs for every annotation
            if type(p) is not list or len(p) < 6 or len(p) & 1 or set(map(type, p)) != _FLOAT:
                return obj
        if math.isfinite(sum(map(sum, seg))):  # inf or nan when any value is (or finite values overflow: left to the check)
            obj["segmentation"] = [array("d", p) for p in seg]
    elif type(seg) is dict and type(seg.get("counts")) is list:
        counts = seg["counts"]
        if set(map(type, counts)) <= _INT and (not counts or 0 <= min(counts) <= max(counts) < 1 << 63):
            seg["counts"] = array("q", counts)
    return obj


_FLOAT, _INT = {float}, {int}


def _plain(value: Any) -> Any:
    """``json.dumps`` default: a packed array as the JSON list it was read from."""
    if type(value) is array:
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(default=_plain)  # json.dumps(..., default=_plain) without making an encoder per document


def json_text(obj: Any) -> str:
    """``obj`` as JSON text that parses back to what ``json.dumps(obj, default=_plain)`` parses back to.

    orjson writes it (5x faster than json at COCO's polygons: store creation at COCO-train size is mostly this) unless
    orjson would say it differently or cannot: NaN and infinities (orjson writes them as ``null``, so any ``null`` in
    its text sends the document to json), integers beyond 64 bits, non-string keys, deep nesting. The text itself may
    differ from json's (no spaces, UTF-8 rather than escapes, ``1e16`` rather than ``1e+16``); readers parse it."""
    try:
        text = orjson.dumps(obj, default=_plain)
    except TypeError:  # orjson.JSONEncodeError
        return _ENCODER.encode(obj)
    return _ENCODER.encode(obj) if b"null" in text else text.decode()


def fast_annotations(
    annotations: Any, images: Mapping[int, Mapping[str, Any]], category_ids: set[int], *, drop_degenerate: bool
) -> dict[int, list[dict[str, Any]]] | None:
    """What :func:`check_annotations` returns, checked column by column; None when anything may be wrong (the exact
    check then names every problem). Needs the segmentations packed by ``_pack`` to be fast; fills ``iscrowd`` and
    ``area`` in place."""
    if annotations is None:
        return {}
    if type(annotations) is not list:
        return None
    anns: list[dict[str, Any]] = annotations
    if not anns:
        return {}
    try:
        if set(map(type, anns)) != {dict}:
            return None
        ids, image_ids = [a.get("id") for a in anns], [a.get("image_id") for a in anns]
        boxes: list[Any] = [a.get("bbox") for a in anns]
        cats = [a.get("category_id") for a in anns]
        if any(set(map(type, col)) != _INT for col in (ids, image_ids, cats)):
            return None
        if len(set(ids)) != len(ids) or not set(image_ids) <= images.keys() or not set(cats) <= category_ids:
            return None
        if not {a.get("iscrowd", 0) for a in anns} <= {0, 1}:
            return None
        areas = [a["area"] for a in anns if "area" in a]
        if areas and not (set(map(type, areas)) <= {int, float} and _finite_nonnegative(np.asarray(areas, dtype=np.float64))):
            return None
        if set(map(type, boxes)) != {list} or set(map(len, boxes)) != {4} or not set(map(type, chain.from_iterable(boxes))) <= {int, float}:
            return None
        box = np.asarray(boxes, dtype=np.float64)  # (n, 4) x, y, w, h
        if not np.isfinite(box).all():
            return None
        for a in anns:
            seg = a.get("segmentation")
            if seg is None or (type(seg) is list and all(type(p) is array for p in seg)):
                continue  # packed: checked while parsing
            if segmentation_problem(seg, images[a["image_id"]]):
                return None
    except (TypeError, ValueError, OverflowError):
        return None
    degenerate = (box[:, 2] <= 0) | (box[:, 3] <= 0)
    if degenerate.any() and not drop_degenerate:
        return None
    if degenerate.any():
        log.warning("coco: dropped %d annotation(s) whose bbox has w or h <= 0", int(degenerate.sum()))
    return _group(anns, np.asarray(ids, dtype=np.int64), np.asarray(image_ids, dtype=np.int64), box, np.flatnonzero(~degenerate))


def _finite_nonnegative(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all() and (x >= 0).all())


def _group(
    anns: list[dict[str, Any]], ids: np.ndarray, image_ids: np.ndarray, box: np.ndarray, keep: np.ndarray
) -> dict[int, list[dict[str, Any]]]:
    """Annotations ``keep`` by image id, each image's sorted by annotation id, ``iscrowd`` and ``area`` filled in."""
    for j in keep.tolist():
        a = anns[j]
        if "iscrowd" not in a:
            a["iscrowd"] = 0
        if "area" not in a:
            a["area"] = float(box[j, 2] * box[j, 3])
    order = keep[np.lexsort((ids[keep], image_ids[keep]))]
    sorted_images = image_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_images[1:] != sorted_images[:-1]])
    bounds = np.r_[starts, len(order)].tolist()
    order_list = order.tolist()
    return {int(sorted_images[a]): [anns[j] for j in order_list[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)}


def _rle_runs(text: str) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None when it is not one."""
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text) or not 48 <= ord(text[p]) < 112:
                return None
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


class CocoSource:
    """COCO detection: one sample per ``images[]`` entry; targets ``image`` and ``annotations`` (JSON strings)."""

    kind = "coco"
    task = "detection"

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        drop_degenerate_boxes: bool = False,
        stuff_root: str | Path | None = None,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.annotations = Path(annotations)
        self.stuff_root = Path(os.path.abspath(stuff_root)) if stuff_root else None
        self.stuff_hw: tuple[int, int] | None = None
        self.max_pixels = max_pixels
        self.drop_degenerate_boxes = drop_degenerate_boxes
        self._images: dict[int, dict[str, Any]] | None = None
        self._anns: dict[int, list[dict[str, Any]]] = {}
        self._categories: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        """Workers only decode: leave the (possibly large) json index behind."""
        return {**self.__dict__, "_images": None, "_anns": {}, "_categories": []}

    def _load(self) -> dict[int, dict[str, Any]]:
        if self._images is not None:
            return self._images
        data = self._parse()
        if not isinstance(data, dict):
            raise MetadataError(f"coco {self.annotations}", ["the top level is not a JSON object with images/annotations/categories"])
        problems: list[str] = []
        self._categories = check_categories(data.get("categories"), problems)
        images = check_images(data.get("images"), self.root, problems)
        cat_ids = {c["id"] for c in self._categories}
        fast = None if problems else fast_annotations(data.get("annotations"), images, cat_ids, drop_degenerate=self.drop_degenerate_boxes)
        anns = fast if fast is not None else check_annotations(
            data.get("annotations"), images, cat_ids, problems, drop_degenerate=self.drop_degenerate_boxes
        )  # fmt: skip
        if self.stuff_root is not None:
            problems += [
                f"image {i}: no stuff map {self._stuff_path(im)}" for i, im in sorted(images.items()) if not self._stuff_path(im).is_file()
            ]
        if problems:
            degenerate = any(DEGENERATE in p for p in problems)
            hint = "fix the json" + (" (or drop them: --drop-degenerate-boxes)" if degenerate else "")
            if any("no stuff map" in p for p in problems):
                hint += " and give a --stuff-root holding a PNG per image"
            raise MetadataError(f"coco {self.annotations}", problems, hint=hint)
        self._images, self._anns = images, anns
        if self.stuff_root is not None and images:  # (Hmax, Wmax) of the stuff target; kept when pickled for workers
            self.stuff_hw = (max(int(im["height"]) for im in images.values()), max(int(im["width"]) for im in images.values()))
        return images

    def _parse(self) -> Any:
        """The json, polygons packed (``_pack``); its text is freed on return."""
        try:
            text = self.annotations.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(
                f"--annotations {self.annotations}: cannot read a COCO json ({e}); give the path of a COCO json file"
            ) from None
        return load_json(text, f"--annotations {self.annotations} (a COCO json)", InputError, object_hook=_pack)

    def samples(self) -> list[SampleRef]:
        images = self._load()
        refs = []
        for image_id in sorted(images):
            im = images[image_id]
            path = os.path.normpath(os.path.join(self.root, im["file_name"]))
            extra: dict[str, Any] = {"width": int(im["width"]), "height": int(im["height"])}
            if self.stuff_root is not None:
                extra["stuff"] = str(self._stuff_path(im))
            refs.append(SampleRef(key=str(image_id), path=path, extra=extra))
        outside = [r.key for r in refs if not r.path.startswith(str(self.root) + os.sep)]
        if outside:
            log.warning("coco: %d image(s) have a file_name escaping --root (ids %s); they will be refused", len(outside), outside[:10])
        return refs

    def _stuff_path(self, image: Mapping[str, Any]) -> Path:
        assert self.stuff_root is not None
        return self.stuff_root / Path(str(image["file_name"])).with_suffix(".png")

    def label_names(self) -> tuple[str, ...]:
        return ()

    def target_specs(self) -> dict[str, TargetSpec]:
        specs = {Targets.IMAGE: TargetSpec("str", (), fill=""), Targets.ANNOTATIONS: TargetSpec("str", (), fill="[]")}
        if self.stuff_root is not None:
            self._load()
            assert self.stuff_hw is not None
            specs[Targets.STUFF] = TargetSpec("uint8", self.stuff_hw, fill=Targets.IGNORE)
        return specs

    def target_attrs(self) -> dict[str, Any]:
        self._load()
        return {"categories": self._categories}

    def driver_targets(self, refs: list[SampleRef]) -> dict[str, np.ndarray]:
        images = self._load()
        ids = [int(r.key) for r in refs]
        return {
            Targets.IMAGE: np.array([json_text(images[i]) for i in ids], dtype=object),
            Targets.ANNOTATIONS: np.array([json_text(self._anns.get(i, [])) for i in ids], dtype=object),
        }

    def decode(self, ref: SampleRef) -> Decoded:
        im, orientation = load_image(ref.path, root=self.root, max_pixels=self.max_pixels)
        expected = (ref.extra["width"], ref.extra["height"])
        message = ""
        if oriented_size(im.size, orientation) != expected:
            if im.size != expected:
                got = "x".join(map(str, oriented_size(im.size, orientation)))
                raise SampleError(Status.SIZE_MISMATCH, f"{ref.path}: the image is {got} but the json says {expected[0]}x{expected[1]}")
            message = f"EXIF orientation {orientation} not applied: the json's width/height are those of the stored pixels"
            orientation = 1
        targets = {Targets.STUFF: self._stuff(ref, im.size, orientation)} if self.stuff_root is not None else {}
        return Decoded(image=to_rgb(im, orientation, name=ref.path), orientation=orientation, message=message, targets=targets)

    def _stuff(self, ref: SampleRef, stored: tuple[int, int], orientation: int) -> np.ndarray:
        """(Hmax, Wmax) uint8 stuff labels of the sample, on its decoded image's pixel grid, padded with 255."""
        path = ref.extra["stuff"]
        label_im, _ = load_image(path, root=self.stuff_root, max_pixels=self.max_pixels)
        if label_im.mode not in LABEL_MODES:
            raise SampleError(Status.DECODE_ERROR, f"{path}: a stuff map must be single-channel (L or P), not {label_im.mode}")
        final = oriented_size(stored, orientation)
        if label_im.size == stored:
            label_im = orient(label_im, orientation)  # a label PNG carries no orientation: on the stored grid, it follows its image
        elif label_im.size != final:
            w, h = label_im.size
            raise SampleError(Status.SIZE_MISMATCH, f"{path}: the stuff map is {w}x{h} but the image is {final[0]}x{final[1]}")
        values = np.asarray(label_im).astype(np.int64)
        label = np.where((values >= 0) & (values < STUFF_CLASSES), values, Targets.IGNORE).astype(np.uint8)  # (h, w)
        assert self.stuff_hw is not None, "samples() sets it before any decoding"
        padded = np.full(self.stuff_hw, Targets.IGNORE, dtype=np.uint8)
        padded[: label.shape[0], : label.shape[1]] = label
        return padded
