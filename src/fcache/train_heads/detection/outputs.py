"""What leaves fcache from a detection head: COCO result records (``fcache.load``, ``fcache predict``'s
predictions.json), boxes and masks drawn over the image, pictures and per-category AP of an evaluation, and the exported
graph (the neck's pyramid: torchvision's RPN, RoI heads and NMS have data-dependent shapes no exported graph holds).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from fcache.common.files import write_json
from fcache.spec import Targets
from fcache.store import FeatureStore
from fcache.train_heads.pictures import LIMIT, PER_IMAGE, enlarge, read_json
from fcache.train_heads.task import ExportDef, NamedInput, OutputOptions, Outputs, PerClass

DETECTIONS = "detections.json"  # the COCO results of an evaluation, written into RUN/eval/<store>
DETECTION_JSON = "detection.json"  # AP of each category per family, written into RUN/eval/<store> by evaluation
PREDICTIONS_JSON = "predictions.json"  # what fcache predict writes


def category_names(task: Any) -> dict[int, str]:
    return {int(c["id"]): str(c.get("name", c["id"])) for c in task.categories}


def present(task: Any, prediction: list[dict[str, Any]], options: OutputOptions) -> list[dict[str, Any]]:
    """The COCO records scoring at least ``score_thr``, each with its category name."""
    names = category_names(task)
    return [d | {"category_name": names.get(d["category_id"], "")} for d in prediction if d["score"] >= options.score_thr]


def image_record(targets: Mapping[str, Any] | None) -> dict[str, Any]:
    """A store sample's image record (its COCO ``images[]`` entry); {} without one."""
    text = str(np.asarray(targets[Targets.IMAGE]).item()) if targets and Targets.IMAGE in targets else ""
    return json.loads(text) if text else {}


class DetectionFiles:
    """``predictions.json``: the COCO results of every input (file name and category name added; a store's sample
    names the file its image record names)."""

    entries: tuple[str, ...] = (PREDICTIONS_JSON,)

    def __init__(self, task: Any, out: Path, options: OutputOptions, view_names: Sequence[str]) -> None:
        self.task, self.out, self.options = task, out, options
        self.detections: list[dict[str, Any]] = []

    def add(self, item: NamedInput, prediction: Any) -> None:
        file = str(image_record(item.targets).get("file_name") or item.file)
        self.detections += [d | {"file_name": file} for d in present(self.task, prediction, self.options)]

    def finish(self) -> dict[str, Any]:
        write_json(self.out / PREDICTIONS_JSON, self.detections, indent=None)
        return {"files": [str(self.out / PREDICTIONS_JSON)], "detections": len(self.detections)}


def truth(store: FeatureStore, index: int, raw: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The sample's COCO annotations, when the store holds them."""
    return json.loads(str(np.asarray(raw[Targets.ANNOTATIONS]).item())) if Targets.ANNOTATIONS in raw else None


def draw(task: Any, image: np.ndarray, prediction: Any, truth: Any, options: OutputOptions) -> np.ndarray:
    """The kept detections over the image; the ground truth (crowds left out) beside it when there is one."""
    from fcache.train_heads.detection.draw import draw_detections
    from fcache.train_heads.drawing import side_by_side

    picture = draw_detections(image, present(task, prediction, options))
    if truth is None:
        return picture
    names = category_names(task)
    gt = [a | {"category_name": names.get(a["category_id"], "")} for a in truth if not a.get("iscrowd")]
    return side_by_side([("prediction", picture), ("ground truth", draw_detections(image, gt))])


def pictures(folder: Path) -> dict[str, np.ndarray]:
    """The ten best-scoring detections of the first images on a grey canvas of the image's size (a store holds no pixels)."""
    from pycocotools import mask as mask_utils
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    images: dict[int, list[dict]] = {}
    for d in read_json(folder / DETECTIONS) or []:
        images.setdefault(int(d["image_id"]), []).append(d)
    out = {}
    for image_id in sorted(images)[:LIMIT]:
        best = sorted(images[image_id], key=lambda d: -d["score"])[:PER_IMAGE]
        sizes = [d["segmentation"]["size"] for d in best if "segmentation" in d]
        extent = (max(int(d["bbox"][1] + d["bbox"][3]) for d in best), max(int(d["bbox"][0] + d["bbox"][2]) for d in best))
        h, w = sizes[0] if sizes else extent
        canvas = torch.full((3, max(h, 1), max(w, 1)), 96, dtype=torch.uint8)
        if sizes:
            masks = np.stack([mask_utils.decode(d["segmentation"]) for d in best if "segmentation" in d]).astype(bool)
            canvas = draw_segmentation_masks(canvas, torch.from_numpy(masks), alpha=0.4)
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (d["bbox"] for d in best)], dtype=torch.float32)
        labels = [f"{d['category_id']} {d['score']:.2f}" for d in best]
        canvas = draw_bounding_boxes(canvas, boxes, labels=labels, colors="yellow")
        out[f"detections/{image_id}"] = enlarge(canvas.permute(1, 2, 0).numpy())
    return out


def per_class(folder: Path) -> PerClass:
    """``box AP`` and ``mask AP`` of each category (detection.json)."""
    d = read_json(folder / DETECTION_JSON) or {}
    return {f"{family} AP per class": {c["class"]: c["AP"] for c in v["classes"]} for family, v in d.items()}


def graph(head: nn.Module, features: dict[str, Tensor], canvas: int) -> dict[str, Tensor]:
    return dict(cast(Any, head).neck(features))


OUTPUTS = Outputs(present, DetectionFiles, truth, draw)
EXPORT = ExportDef("the neck's pyramid: level -> (B, channels, H, W) (no RPN / RoI heads / NMS)", graph)
