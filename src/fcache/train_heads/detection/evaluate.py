"""Box and mask AP with pycocotools' COCOeval, against ground truth rebuilt from the store's targets.

As detectron2 does, mask AP is computed from the records without their ``bbox`` so pycocotools takes each
detection's area from its mask. Metrics are COCOeval's ``stats`` (0..1; -1 where no ground truth falls in an area range).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


def coco_ground_truth(
    images: Sequence[Mapping[str, Any]], annotations: Sequence[Sequence[Mapping[str, Any]]], categories: Sequence[Mapping[str, Any]]
) -> COCO:
    """An in-memory COCO object of the evaluated images.

    Annotation ids are renumbered 1..M (COCOeval counts a match with id 0 as no match); missing ``iscrowd`` reads as 0
    and a missing ``area`` as the box area.
    """
    anns: list[dict[str, Any]] = []
    for image, image_anns in zip(images, annotations, strict=True):
        for a in image_anns:
            rec = dict(a)
            rec["image_id"] = image["id"]
            rec["id"] = len(anns) + 1
            rec.setdefault("iscrowd", 0)
            rec.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
            anns.append(rec)
    coco = COCO()
    coco.dataset = {"images": [dict(im) for im in images], "annotations": anns, "categories": [dict(c) for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt: COCO, detections: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """``box/AP`` ... ``mask/APl`` of COCO result records (bbox xywh + optional RLE segmentation) against ``gt``, and
    the AP of each category per family (``{"box": [{"class", "id", "AP"}, ...], "mask": [...]}``, see :func:`per_class_ap`)."""
    out: dict[str, float] = {}
    per_class: dict[str, list[dict[str, Any]]] = {}
    for iou_type, prefix in IOU_TYPES.items():
        if iou_type == "bbox":
            dets = [dict(d) for d in detections]
        else:
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in detections if "segmentation" in d]
        if not dets:  # pycocotools cannot load an empty result list; nothing detected scores 0
            out.update({f"{prefix}/{m}": 0.0 for m in METRICS})
            per_class[prefix] = per_class_ap(gt, None)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out.update({f"{prefix}/{m}": float(v) for m, v in zip(METRICS, ev.stats[: len(METRICS)], strict=True)})
        per_class[prefix] = per_class_ap(gt, ev)
    return out, per_class


def per_class_ap(gt: COCO, ev: COCOeval | None) -> list[dict[str, Any]]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category of ``gt``, as detectron2 derives it from COCOeval's
    precision array; None for a category without ground truth, 0 for every other one when nothing was detected (``ev``
    None)."""
    out = []
    for k, cid in enumerate(sorted(gt.getCatIds())):
        name = str(gt.cats[cid].get("name", cid))
        has_truth = bool(gt.getAnnIds(catIds=[cid], iscrowd=False))
        if ev is None:
            ap = 0.0 if has_truth else None
        else:
            assert list(ev.params.catIds) == sorted(gt.getCatIds()), "COCOeval orders categories by id"
            p = ev.eval["precision"][:, :, k, 0, -1]  # (IoU thresholds, recall points) at area all, maxDets 100
            p = p[p > -1]
            ap = float(p.mean()) if p.size else None
        out.append({"class": name, "id": int(cid), "AP": ap})
    return out
