"""The semantic segmentation task (ADE20K, paper Table 3 and Appendix B Tables 9-10): the HEADS table and the loop's Task.

Head specs: ``upernet[:neck=fpn|fpn-res|bifpn,layers=k,channels=512,norm=gn|bn,aux=0|1,levels=all]`` (plus the neck's own
parameters, e.g. ``neck=bifpn,checkpoint=1`` or ``neck=fpn-res,blocks=2``) and
``mask2former[:pixel_blocks=1,decoder_blocks=3,channels=256,queries=100,levels=all]``. Training defaults per head
come from the paper's Table 12 (frozen setting): Mask2Former lr 3e-4, weight decay 0.02, no warm-up, linear decay;
UPerNet lr 2e-3, weight decay 0.05, 1500 warm-up iterations (from 1e-6 x lr, mmseg's ratio), linear decay.
Evaluation reads every view of each sample: single-scale scores come from view 0, ms+flip from the mean of the
probabilities of all views mapped back to the original image; metrics as mmsegmentation's (ignore 255).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.common.files import write_json
from fcache.common.outputs import output_names
from fcache.spec import Geometry, LevelSpec, Targets
from fcache.store import FeatureStore
from fcache.train_heads.data import KEY, VIEW_GEOMETRY, VIEW_NAMES
from fcache.train_heads.headspec import HeadDef, HeadSpec, Param, select_levels
from fcache.train_heads.necks.base import NORMS
from fcache.train_heads.segmentation import metrics as M
from fcache.train_heads.segmentation.labelmaps import label_png
from fcache.train_heads.segmentation.mask2former import build_mask2former
from fcache.train_heads.segmentation.outputs import EXPORT, LABELS, OUTPUTS, SEGMENTATION_JSON, per_class, pictures
from fcache.train_heads.segmentation.synthetic import BENCH
from fcache.train_heads.segmentation.targets import ground_truth, view_labels
from fcache.train_heads.segmentation.upernet import UPERNET_NECKS, build_upernet
from fcache.train_heads.task import Batch, TaskDef

LEVELS = Param("all", kind="levels", help="stored levels the head reads: all, or e.g. p3+p4+p5")


def _check_upernet(spec: HeadSpec) -> None:
    layered = [name for name, neck in UPERNET_NECKS.items() if "layers" in neck.params]
    if spec["neck"] not in layered and spec["layers"] != 1:
        raise InputError(
            f"head upernet: layers={spec['layers']} applies to neck={'/'.join(layered)} only (e.g. upernet:neck={layered[0]},layers=5)"
        )


def _upernet(task: SegmentationTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    return build_upernet(levels, dict(task.head.params), task.num_classes)


def _mask2former(task: SegmentationTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    return build_mask2former(levels, dict(task.head.params), task.num_classes)


HEADS: dict[str, HeadDef] = {
    "upernet": HeadDef(
        {
            "neck": Param(
                "fpn",
                kind="choice",
                choices=tuple(UPERNET_NECKS),
                help="the FPN part: fpn (mmseg's UPerHead), or a neck of the NECKS table (bifpn: k layers), with its own parameters",
                options={name: neck.params for name, neck in UPERNET_NECKS.items()},
            ),
            "layers": Param(1, maximum=32, help="BiFPN layers (neck=bifpn only)"),
            "channels": Param(512, maximum=4096, help="width of PPM, neck and fuse conv (mmseg's UPerHead: 512); the aux head is half"),
            "norm": Param("gn", kind="choice", choices=NORMS, help="norm of every ConvModule (PPM, FPN, fuse, aux) and of the BiFPN"),
            "aux": Param(False, kind="bool", help="1: auxiliary FCN head on the second-deepest level, loss weight 0.4"),
            "levels": LEVELS,
        },
        _upernet,
        {"lr": 2e-3, "weight_decay": 0.05, "warmup": 1500, "warmup_factor": 1e-6, "schedule": "linear"},
        check=_check_upernet,
    ),
    "mask2former": HeadDef(
        {
            "pixel_blocks": Param(1, maximum=32, help="deformable-attention encoder blocks of the pixel decoder"),
            "decoder_blocks": Param(3, maximum=32, help="masked-attention blocks m (the paper's '(m+1) x Transformer Dec.')"),
            "channels": Param(256, maximum=4096, help="pixel decoder, query and mask width"),
            "queries": Param(100, maximum=4096, help="learnable queries"),
            "levels": LEVELS,
        },
        _mask2former,
        {"lr": 3e-4, "weight_decay": 0.02, "warmup": 0, "schedule": "linear"},
    ),
}


def parse_segmentation_head(text: str) -> HeadSpec:
    return TASK.parse(text)


class SegmentationTask:
    """UPerNet / Mask2Former over cached features, scored by mIoU at original resolution (single scale and ms+flip)."""

    name: str = "segmentation"
    target_names: tuple[str, ...] = (Targets.SEGMENTATION,)
    eval_target_names: tuple[str, ...] = target_names

    def __init__(self, head: HeadSpec, label_names: Sequence[str]) -> None:
        if not label_names:
            raise InputError("a segmentation task needs the class names (dataset.label_names of the store)")
        self.head, self.label_names = head, tuple(label_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @classmethod
    def from_store(cls, store: FeatureStore, head: str) -> SegmentationTask:
        check_store(store)
        return cls(parse_segmentation_head(head), store.manifest.dataset.label_names)

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> SegmentationTask:
        return cls(parse_segmentation_head(d["head"]), d["label_names"])

    def describe(self) -> dict[str, Any]:
        return {"head": str(self.head), "label_names": list(self.label_names)}

    def levels(self, available: Sequence[LevelSpec]) -> tuple[LevelSpec, ...]:
        return select_levels(self.head, available)

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module:
        return HEADS[self.head.name].build(self, levels)

    def targets(self, item: Mapping[str, Any], geometry: Geometry) -> Tensor:
        """(canvas, canvas) uint8 labels of the item's view, 255 outside its content."""
        return torch.from_numpy(view_labels(np.asarray(item["targets"][Targets.SEGMENTATION]), geometry))

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        labels = torch.stack(batch.targets).long()  # (B, S, S)
        return cast(Any, model).losses(model(batch.features), labels)

    def predict(self, model: nn.Module, batch: Batch) -> list[dict[str, Any]]:
        """Per sample: the view names, sparse confusions of each view and of the views' mean probabilities (when the
        item carries its ground truth), and the predicted label map (the argmax of that mean) as an indexed PNG.

        Each sample's label map is consumed here and dropped from ``batch.raw``, which the loop keeps for the whole
        set: evaluation then holds confusion counts and compressed label maps, not label maps.
        """
        feats = batch.features
        multi = next(iter(feats.values())).ndim == 5  # (B, V, C, H, W) from AllViews, else one view (B, C, H, W)
        views = [_view_geometry(raw, g) for raw, g in zip(batch.raw, batch.geometry, strict=True)]
        truth = [_truth(raw, g) for raw, g in zip(batch.raw, batch.geometry, strict=True)]
        names = [tuple(raw.pop(VIEW_NAMES, ("plain",))) for raw in batch.raw]
        sums: list[Tensor | None] = [None] * len(truth)
        per_view: list[list[M.Sparse]] = [[] for _ in truth]
        for v in range(len(views[0])):
            out = model({lv: x[:, v] if multi else x for lv, x in feats.items()})
            for j, gt in enumerate(truth):
                probs = cast(Any, model).probabilities(out, j, views[j][v]).float()  # (K, orig_h, orig_w)
                if gt is not None:
                    per_view[j].append(M.confusion_codes(probs.argmax(0).cpu().numpy(), gt, self.num_classes))
                sums[j] = probs if sums[j] is None else sums[j] + probs
        out_ = []
        for nm, pv, s, gt in zip(names, per_view, sums, truth, strict=True):
            labels = cast(Tensor, s).argmax(0).cpu().numpy()  # (orig_h, orig_w)
            mean = M.confusion_codes(labels, gt, self.num_classes) if gt is not None else None
            out_.append({"names": nm, "views": pv, "mean": mean, "labels": label_png(labels, self.num_classes)})
        return out_

    def evaluate(self, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any], out: Path | None) -> dict[str, float]:
        """``ss/mIoU|mAcc|aAcc`` and, with test views, the same for their mean (``ms+flip/...``); writes RUN/segmentation.json."""
        if not predictions:
            raise InputError("no sample to evaluate")
        names = predictions[0]["names"]
        single = M.scores(M.accumulate((p["views"][0] for p in predictions), self.num_classes))
        metrics = _summary("ss", single)
        report: dict[str, Any] = {"views": list(names), "single_scale": _report(self.label_names, single)}
        if len(names) > 1:
            family = multi_view_name(names)
            multi = M.scores(M.accumulate((p["mean"] for p in predictions), self.num_classes))
            metrics |= _summary(family, multi)
            report[family] = _report(self.label_names, multi)
            report["per_view_mIoU"] = {
                n: _defined(M.scores(M.accumulate((p["views"][v] for p in predictions), self.num_classes))["mIoU"])
                for v, n in enumerate(names)
            }
        if out is not None:
            write_json(Path(out) / SEGMENTATION_JSON, report)
            write_label_maps(Path(out) / LABELS, raw, predictions)
        return metrics


def write_label_maps(folder: Path, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any]) -> None:
    """``labels/<sample key>.png``: each sample's predicted label map (the views' mean), indexed with the class palette."""
    written = [(r.get(KEY), p["labels"]) for r, p in zip(raw, predictions, strict=True) if "labels" in p]
    if not written:
        return
    names = output_names([str(key if key is not None else k) for k, (key, _) in enumerate(written)], "samples")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, png) in zip(names, written, strict=True):
        (folder / f"{name}.png").write_bytes(png)


def _truth(raw: dict[str, Any], g: Geometry) -> np.ndarray | None:
    """The item's label map at original resolution, consumed from ``raw``; None for an item without ground truth."""
    label = raw.pop(Targets.SEGMENTATION, None)
    return None if label is None else ground_truth(label, g)


def multi_view_name(names: Sequence[str]) -> str:
    """``ms+flip``, ``ms`` or ``flip``: what the test views after the plain view add."""
    flip = any("flip" in n for n in names[1:])
    ms = any(n.startswith("s") for n in names[1:])
    return "+".join(part for part, used in (("ms", ms), ("flip", flip)) if used) or "views"


def _view_geometry(raw: dict[str, Any], g: Geometry) -> list[Geometry]:
    stacked = raw.pop(VIEW_GEOMETRY, None)
    return [g] if stacked is None else [Geometry.from_array(np.asarray(a)) for a in stacked]


def _defined(x: float) -> float:
    return -1.0 if np.isnan(x) else x


def _summary(family: str, s: Mapping[str, Any]) -> dict[str, float]:
    return {f"{family}/{k}": _defined(s[k]) for k in ("mIoU", "mAcc", "aAcc")}


def _report(label_names: Sequence[str], s: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _defined(s[k]) for k in ("mIoU", "mAcc", "aAcc")} | {"classes": M.per_class_table(label_names, s)}


def check_store(store: FeatureStore) -> None:
    """The store can train or evaluate a segmentation head: image features, label maps and class names."""
    if store.video:
        raise InputError(f"{store.root} is a video store; --task segmentation needs image features of an ADE20K-style source")
    if Targets.SEGMENTATION not in store.target_names:
        kind = store.manifest.dataset.task or store.manifest.dataset.kind
        have = ", ".join(store.target_names) or "none"
        raise InputError(
            f"{store.root} has no '{Targets.SEGMENTATION}' targets (it is a {kind} store with targets: {have}); "
            "--task segmentation needs a store extracted with --dataset ade20k or seg-folder"
        )
    if not store.manifest.dataset.label_names:
        raise InputError(f"{store.root} records no class names (dataset.label_names); re-extract it with a segmentation source")


def check_eval_store(task: SegmentationTask, store: FeatureStore) -> None:
    """``store`` can score ``task``'s head: a segmentation store with the classes the head was trained on."""
    check_store(store)
    names = tuple(store.manifest.dataset.label_names)
    if names != task.label_names:
        raise InputError(
            f"{store.root} has {len(names)} classes ({', '.join(names[:3])}, ...) but the head was trained on "
            f"{task.num_classes} ({', '.join(task.label_names[:3])}, ...); evaluate on a store of the same dataset"
        )


TASK = TaskDef(
    "segmentation",
    HEADS,
    SegmentationTask,
    check_eval_store,
    "ss/mIoU",
    eval_views="all",  # single scale from view 0, ms+flip from all of them
    metric_names=("mIoU", "mAcc", "aAcc"),
    outputs=OUTPUTS,
    pictures=pictures,
    per_class=per_class,
    export=EXPORT,
    bench=BENCH,
)
