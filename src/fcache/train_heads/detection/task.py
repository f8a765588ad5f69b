"""The detection task (COCO boxes + instance masks, paper §5.1, Tables 2 and 6): the HEADS table and the loop's Task.

Head spec: ``fpn | fpn-res | bifpn`` with the neck's keys plus ``roi`` (a ROI_HEADS key: standard, cascade, htc),
``score`` (how a cascade combines its stages' class scores), ``semantic`` (HTC's semantic branch, trained on the store's
stuff maps), ``rois`` (RoIs sampled per image, 512), ``rpn_batch`` (anchors sampled per image, 256) and ``levels``
(``all`` or e.g. ``p3+p4+p5``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.common.files import write_json
from fcache.spec import Geometry, LevelSpec, Targets
from fcache.store import FeatureStore
from fcache.train_heads.detection.cascade import SCORES
from fcache.train_heads.detection.conventions import BEFORE_RECORD, CURRENT, conventions
from fcache.train_heads.detection.evaluate import coco_evaluate, coco_ground_truth
from fcache.train_heads.detection.model import ROI_HEADS, build_detector
from fcache.train_heads.detection.outputs import DETECTION_JSON, DETECTIONS, EXPORT, OUTPUTS, per_class, pictures
from fcache.train_heads.detection.synthetic import BENCH
from fcache.train_heads.detection.targets import category_labels, content_size, detections_to_coco, view_targets
from fcache.train_heads.headspec import HeadDef, HeadSpec, Param, select_levels
from fcache.train_heads.necks import NECKS
from fcache.train_heads.segmentation.targets import view_labels
from fcache.train_heads.task import Batch, TaskDef

ROI_PARAMS: dict[str, Param] = {
    "roi": Param("standard", kind="choice", choices=tuple(ROI_HEADS), help="; ".join(f"{k}: {r.help}" for k, r in ROI_HEADS.items())),
    "score": Param(
        "logits", kind="choice", choices=SCORES, help="cascade, htc: stage class scores combined as the mean of logits, or of probabilities"
    ),
    "semantic": Param(False, kind="bool", help="htc: 1 adds the semantic branch (needs a store extracted with --stuff-root)"),
    "rois": Param(512, maximum=8192, help="RoIs sampled per image for the box head"),
    "rpn_batch": Param(256, maximum=8192, help="anchors sampled per image for the RPN loss"),
    "levels": Param("all", kind="levels", help="stored levels the head reads: all, or e.g. p3+p4+p5"),
}


def _build(task: DetectionTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    return build_detector(levels, task.head.name, dict(task.head.params), len(task.labels) + 1, conventions(task.conventions))


def _check(spec: HeadSpec) -> None:
    if spec["semantic"] and spec["roi"] != "htc":
        raise InputError(f"head {spec.name}: semantic=1 is HTC's semantic branch; add roi=htc or drop semantic")
    if spec["score"] != "logits" and spec["roi"] == "standard":
        raise InputError(f"head {spec.name}: score={spec['score']} combines cascade stages; use roi=cascade or roi=htc, or drop score")


# a detection head = a neck (NECKS) + RPN + RoI heads (ROI_HEADS); training defaults are TrainConfig's own (Table 11)
HEADS: dict[str, HeadDef] = {name: HeadDef({**neck.params, **ROI_PARAMS}, _build, check=_check) for name, neck in NECKS.items()}


def parse_detection_head(text: str) -> HeadSpec:
    return TASK.parse(text)


def _text(x: Any) -> str:
    """A stored string target (zarr gives 0-d string arrays) as str."""
    return str(x.item() if isinstance(x, np.ndarray) else x)


def _json(raw: Mapping[str, Any], name: str, default: Any) -> Any:
    text = _text(raw[name]) if name in raw else ""
    return json.loads(text) if text else default


class DetectionTask:
    """Mask R-CNN / Cascade Mask R-CNN / HTC over cached features, scored by COCO box and mask AP."""

    name: str = "detection"
    eval_target_names: tuple[str, ...] = (Targets.IMAGE, Targets.ANNOTATIONS)

    def __init__(self, head: HeadSpec, categories: Sequence[Mapping[str, Any]], conventions: str = CURRENT) -> None:
        if not categories:
            raise InputError("a detection task needs the COCO categories (targets attrs['categories'] of the store)")
        self.head = head
        self.semantic: bool = head["semantic"]
        self.target_names = self.eval_target_names + ((Targets.STUFF,) if self.semantic else ())
        self.categories = tuple(dict(c) for c in categories)
        self.labels = category_labels(self.categories)
        self.category_ids = sorted(self.labels)
        self.conventions = conventions  # a CONVENTIONS key: new heads follow mmdetection, RUNs keep what they were trained with

    @classmethod
    def from_store(cls, store: FeatureStore, head: str) -> DetectionTask:
        check_store(store)
        task = cls(parse_detection_head(head), store.target_attrs["categories"])
        if task.semantic and Targets.STUFF not in store.target_names:
            raise InputError(
                f"{store.root} has no '{Targets.STUFF}' maps for semantic=1; extract it with --stuff-root DIR (COCO-stuff) or drop semantic"
            )
        return task

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> DetectionTask:
        conv = str(d.get("conventions", BEFORE_RECORD))
        conventions(conv)
        return cls(parse_detection_head(d["head"]), d["categories"], conv)

    def describe(self) -> dict[str, Any]:
        return {"head": str(self.head), "categories": list(self.categories), "conventions": self.conventions}

    def levels(self, available: Sequence[LevelSpec]) -> tuple[LevelSpec, ...]:
        return select_levels(self.head, available)

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module:
        return HEADS[self.head.name].build(self, levels)

    def targets(self, item: Mapping[str, Any], geometry: Geometry) -> dict[str, Tensor]:
        """Boxes, labels and masks of the view; with the semantic branch also its ``stuff`` labels (canvas, canvas) uint8."""
        out = view_targets(_json(item["targets"], Targets.ANNOTATIONS, []), geometry, self.labels)
        if self.semantic:
            out[Targets.STUFF] = torch.from_numpy(view_labels(np.asarray(item["targets"][Targets.STUFF]), geometry))
        return out

    def _forward(self, model: nn.Module, batch: Batch, targets: list[Any] | None) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        canvas = {round(g.canvas) for g in batch.geometry}
        if len(canvas) != 1:
            raise ValueError(f"a batch mixes canvas sizes {sorted(canvas)}; views of one store share one input size")
        return model(batch.features, [content_size(g) for g in batch.geometry], canvas.pop(), targets)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return self._forward(model, batch, batch.targets)[0]

    def predict(self, model: nn.Module, batch: Batch) -> list[list[dict[str, Any]]]:
        """COCO result records per sample, in original image coordinates."""
        _, detections = self._forward(model, batch, None)
        out = []
        for det, g, raw, index in zip(detections, batch.geometry, batch.raw, batch.index, strict=True):
            image_id = int(_json(raw, Targets.IMAGE, {}).get("id", index))
            out.append(detections_to_coco(det, g, image_id, self.category_ids))
        return out

    def evaluate(self, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any], out: Path | None) -> dict[str, float]:
        """Box and mask AP of the predictions against the items' own annotations; writes the detections and the AP of
        each category (``detection.json``) into ``out``."""
        images = [_json(r, Targets.IMAGE, {}) for r in raw]
        bad = [i for i, im in enumerate(images) if not {"id", "height", "width"} <= set(im)]
        if bad:
            raise InputError(f"{len(bad)} evaluated sample(s) lack an image record with id, height and width (targets/image)")
        annotations = [_json(r, Targets.ANNOTATIONS, []) for r in raw]
        detections = [d for per_image in predictions for d in per_image]
        metrics, per_class = coco_evaluate(coco_ground_truth(images, annotations, self.categories), detections)
        if out is not None:
            write_json(Path(out) / DETECTIONS, detections, indent=None)
            write_json(Path(out) / DETECTION_JSON, {family: {"classes": rows} for family, rows in per_class.items()})
        return metrics


def check_store(store: FeatureStore) -> None:
    """The store can train or evaluate a detection head: image features, COCO annotations and categories."""
    if store.video:
        raise InputError(f"{store.root} is a video store; --task detection needs image features of a COCO-style source")
    if Targets.ANNOTATIONS not in store.target_names:
        kind = store.manifest.dataset.task or store.manifest.dataset.kind
        have = ", ".join(store.target_names) or "none"
        raise InputError(
            f"{store.root} has no '{Targets.ANNOTATIONS}' targets (it is a {kind} store with targets: {have}); "
            "--task detection needs a store extracted from a COCO detection source"
        )
    if not store.target_attrs.get("categories"):
        raise InputError(f"{store.root} has no COCO categories in its targets attributes; re-extract it from the COCO json")


def check_eval_store(task: DetectionTask, store: FeatureStore) -> None:
    """``store`` can score ``task``'s head: a detection store with the categories the head was trained on."""
    check_store(store)
    ids = sorted(int(c["id"]) for c in store.target_attrs["categories"])
    if ids != task.category_ids:
        raise InputError(
            f"{store.root} has categories {ids[:10]}{'...' if len(ids) > 10 else ''} but the head was trained on "
            f"{task.category_ids[:10]}{'...' if len(task.category_ids) > 10 else ''}; evaluate on a store of the same dataset"
        )


TASK = TaskDef(
    "detection",
    HEADS,
    DetectionTask,
    check_eval_store,
    "box/AP",
    metric_names=("AP", "AP50", "AP75", "APs", "APm", "APl"),
    outputs=OUTPUTS,
    pictures=pictures,
    per_class=per_class,
    export=EXPORT,
    bench=BENCH,
)
