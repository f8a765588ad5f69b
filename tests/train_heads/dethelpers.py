"""Tiny COCO-style detection stores with learnable synthetic features (they encode where the objects are), and tiny
detectors with random features and targets for the head tests.

Every feature cell whose centre lies inside an object's box carries: objectness, a one-hot class, the distances
from the cell centre to the four box edges (FCOS-style, /64), and whether it lies inside the object's ellipse
(its mask). Boxes are mapped into each view with the view's Geometry, so flipped views encode flipped boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from fcache import store as fstore
from fcache.spec import (
    GEOMETRY_FIELDS,
    BackboneInfo,
    DatasetInfo,
    Geometry,
    LevelSpec,
    Manifest,
    Preprocessing,
    SourceConfig,
    Status,
    StorageSpec,
    Targets,
    keys_digest,
)
from fcache.store import TargetSpec
from fcache.store.dtypes import stored
from fcache.train_heads.detection.model import build_detector
from fcache.train_heads.detection.task import parse_detection_head

CANVAS = 128
ORIG_W, ORIG_H = 256, 192  # scale 0.5 -> content 128 x 96 on the canvas
CATEGORIES = [{"id": 7, "name": "ring", "supercategory": "shape"}, {"id": 3, "name": "disc", "supercategory": "shape"}]
LEVELS = (LevelSpec("p2", 8, 4), LevelSpec("p3", 12, 8), LevelSpec("p4", 16, 16), LevelSpec("p5", 8, 32))
ENCODED = 8  # objectness, 2 classes, 4 edge distances, ellipse
SIZES = [(96, 128), (128, 80)]  # (valid_h, valid_w) of two views of a batch of features(): a wide one and a tall one

# (category id, x, y, w, h) in original pixels; two images
OBJECTS = [
    [(7, 20, 30, 90, 70), (3, 140, 40, 80, 120), (3, 40, 120, 60, 50)],
    [(3, 30, 20, 120, 100), (7, 170, 90, 60, 80)],
]


def plain(flip: bool = False) -> Geometry:
    return Geometry(
        orig_h=ORIG_H,
        orig_w=ORIG_W,
        scale=CANVAS / ORIG_W,
        valid_w=CANVAS,
        valid_h=CANVAS * ORIG_H / ORIG_W,
        flip=float(flip),
        canvas=CANVAS,
    )


def ellipse_polygon(x: float, y: float, w: float, h: float, n: int = 24) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)], 1).ravel().round(2).tolist()


def annotations(image_id: int, objects: list[tuple[int, float, float, float, float]], crowd: bool = True) -> list[dict]:
    """COCO annotations: ellipse polygons, one as compressed RLE, plus an optional crowd box (never encoded in features)."""
    anns = []
    for k, (cat, x, y, w, h) in enumerate(objects):
        poly = ellipse_polygon(x, y, w, h)
        seg: object = [poly]
        if k == 1:  # exercise the RLE path
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], ORIG_H, ORIG_W))
            seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([poly], ORIG_H, ORIG_W))))
        anns.append(
            {
                "id": 100 * image_id + k,
                "image_id": image_id,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "area": area,
                "iscrowd": 0,
                "segmentation": seg,
            }
        )
    if crowd:
        rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((10, 12), np.uint8), ((170, 12), (230, 14)))))
        seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        anns.append(
            {
                "id": 100 * image_id + 99,
                "image_id": image_id,
                "category_id": 3,
                "bbox": [230, 170, 12, 10],
                "area": 120.0,
                "iscrowd": 1,
                "segmentation": seg,
            }
        )
    return anns


def encode_features(
    objects: list[tuple[int, float, float, float, float]], g: Geometry, levels: tuple[LevelSpec, ...], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """level -> (C, S, S) features of one view."""
    class_index = {c["id"]: k for k, c in enumerate(sorted(CATEGORIES, key=lambda c: c["id"]))}
    boxes = g.boxes_to_view(np.array([[x, y, x + w, y + h] for _, x, y, w, h in objects], dtype=np.float64))
    order = np.argsort([-(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])  # small objects painted last, on top
    out = {}
    for lv in levels:
        s = lv.size(CANVAS)
        f = rng.normal(0, 0.05, (lv.channels, s, s)).astype(np.float32)
        cx = (np.arange(s) + 0.5) * lv.stride
        xx, yy = np.meshgrid(cx, cx)
        for k in order:
            x0, y0, x1, y1 = boxes[k]
            inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
            code = np.zeros((ENCODED, s, s), np.float32)
            code[0] = 1
            code[1 + class_index[objects[k][0]]] = 1
            code[3:7] = np.stack([xx - x0, x1 - xx, yy - y0, y1 - yy]) / 64
            code[7] = (((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2) <= 1
            f[:ENCODED, inside] = code[:, inside]
        out[lv.name] = f
    return out


def manifest(
    n: int, levels: tuple[LevelSpec, ...], views: int, kind: str = "coco", task: str = "detection", dtype: str = "fp32", codec: str = "none"
) -> tuple[Manifest, list[str]]:
    keys = [str(i + 1) for i in range(n)]
    m = Manifest(
        backbone=BackboneInfo("synthetic", "synthetic", "random-init", CANVAS, 8, levels),
        preprocessing=Preprocessing(views=views, view_flip=views > 1),
        storage=StorageSpec(dtype=dtype, codec=codec, shard_size=4),
        dataset=DatasetInfo(SourceConfig(kind, ""), n=n, digest=keys_digest(keys), task=task),
        fcache_version="test",
    )
    return m, keys


def stuff_map(objects: list[tuple[int, float, float, float, float]]) -> np.ndarray:
    """(ORIG_H, ORIG_W) uint8 stuff labels: 1 + the class index inside each object's box, 0 elsewhere, 255 on the last 16 rows."""
    class_index = {c["id"]: k for k, c in enumerate(sorted(CATEGORIES, key=lambda c: c["id"]))}
    out = np.zeros((ORIG_H, ORIG_W), np.uint8)
    for cat, x, y, w, h in sorted(objects, key=lambda o: -o[3] * o[4]):  # small objects painted last, as the features
        out[int(y) : int(y + h), int(x) : int(x + w)] = 1 + class_index[cat]
    out[-16:] = Targets.IGNORE
    return out


def build_detection_store(
    path: Path,
    *,
    levels: tuple[LevelSpec, ...] = LEVELS,
    views: int = 2,
    objects: list = OBJECTS,
    failed: tuple[int, ...] = (),
    with_annotations: bool = True,
    crop_first_view: bool = False,
    stuff: bool = False,
    dtype: str = "fp32",
    codec: str = "none",
) -> Path:
    """A store of len(objects) images; view 0 plain, view 1 mirrored. ``with_annotations=False`` gives a classification store;
    ``crop_first_view`` makes view 0 a crop (as an extraction with random training views does); ``stuff`` adds COCO-stuff
    style label maps (``stuff_map``). ``dtype``: any stored form (a projected one fitted on the first image's plain view)."""
    n = len(objects)
    m, keys = manifest(n, levels, views, *(() if with_annotations else ("folder", "classification")), dtype=dtype, codec=codec)
    if with_annotations:
        targets = {"image": TargetSpec("str"), "annotations": TargetSpec("str")}
        attrs = {"categories": CATEGORIES}
    else:
        targets, attrs = {"label": TargetSpec("int64", fill=-1)}, {}
    if stuff:
        targets[Targets.STUFF] = TargetSpec("uint8", (ORIG_H, ORIG_W), fill=Targets.IGNORE)
    first = encode_features(objects[0], plain(), levels, np.random.default_rng(1))
    bases = {lv.name: b for lv in levels if (b := stored(dtype).fit(first[lv.name])) is not None}
    writer = fstore.create(path, m, keys, targets=targets, target_attrs=attrs, bases=bases)
    if with_annotations:
        images = [json.dumps({"id": i + 1, "width": ORIG_W, "height": ORIG_H, "file_name": f"{i + 1}.jpg"}) for i in range(n)]
        anns = [json.dumps(annotations(i + 1, objs)) for i, objs in enumerate(objects)]
        writer.write_targets("image", np.array(images, dtype=object))
        writer.write_targets("annotations", np.array(anns, dtype=object))
    if stuff:
        writer.write_targets(Targets.STUFF, np.stack([stuff_map(objs) for objs in objects]))
    rng = np.random.default_rng(0)
    for unit in writer.pending():
        feats = {lv.name: np.zeros((len(unit), views, *m.level_shape(lv.name)), np.float32) for lv in levels}
        status = np.full(len(unit), int(Status.OK), np.uint8)
        geometry = np.zeros((len(unit), views, len(GEOMETRY_FIELDS)), np.float32)
        for j, i in enumerate(range(unit.start, unit.stop)):
            if i in failed:
                status[j] = int(Status.DECODE_ERROR)
                continue
            for v in range(views):
                g = plain(flip=v == 1)
                if crop_first_view and v == 0:
                    g = Geometry(**{**g.to_dict(), "crop_x0": 8.0, "valid_w": g.valid_w - 8})
                geometry[j, v] = g.to_array()
                for name, x in encode_features(objects[i], g, levels, rng).items():
                    feats[name][j, v] = x
        writer.write_unit(unit, feats, status, geometry)
    writer.finalize()
    return path


def features(levels):
    """level -> (2, C, S, S) random features of two views on the canvas."""
    torch.manual_seed(1)
    return {lv.name: torch.randn(2, lv.channels, lv.size(CANVAS), lv.size(CANVAS)) for lv in levels}


def targets():
    """Training targets of the two views of features(): two objects, then none; stuff labels on both."""
    stuff = torch.full((CANVAS, CANVAS), 255, dtype=torch.uint8)
    stuff[:64, :64], stuff[64:, 64:] = 3, 100
    return [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 2]),
            "masks": torch.ones(2, 96, 128, dtype=torch.uint8),
            "stuff": stuff,
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 128, 80, dtype=torch.uint8),
            "stuff": stuff,
        },
    ]


def detector(name, levels, roi, channels=32, num_classes=3):
    """A seeded detector ``name:roi=...`` with 32 sampled RoIs and anchors; ``num_classes`` counts the background."""
    spec = parse_detection_head(f"{name}:channels={channels},rois=32,rpn_batch=32,roi={roi}")
    torch.manual_seed(0)
    return build_detector(levels, spec.name, dict(spec.params), num_classes=num_classes)
