"""The monocular depth task (NYU-Depth v2 style, as DINOv2 and other frozen-feature evaluations report it): the HEADS
table and the loop's Task.

Head specs: ``linear[:levels=last,bins=256,upsample=4,min_depth=0.001,max_depth=10.0,crop=none]`` (DINOv2's linear
depth probe, ``linear.py``) and ``dpt[:levels=all,channels=256,min_depth=0.001,max_depth=10.0,crop=none]`` (a DPT
decoder, ``dpt.py``). Both train with DINOv2's SigLoss on the view's pixels with a ground truth at canvas resolution;
predictions are clamped to [min_depth, max_depth] (DINOv2's inference) and mapped back to the original image as
segmentation scores are. Evaluation reads every view: NYU's RMSE (the main metric, lower is better), AbsRel, log10 and
d1..d3 at original resolution (``metrics.py``; ``crop=nyu`` scores Eigen's crop only) of view 0 (``ss``) and, with test
views, of the views' mean depth (``flip``, ``ms+flip``, as segmentation names them).
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
from fcache.train_heads.depth import metrics as M
from fcache.train_heads.depth.dpt import DPTDepth
from fcache.train_heads.depth.linear import LinearDepth, sigloss
from fcache.train_heads.depth.maps import depth_png, view_depth
from fcache.train_heads.depth.outputs import DEPTH, DEPTH_JSON, EXPORT, OUTPUTS, per_class, pictures
from fcache.train_heads.depth.synthetic import BENCH
from fcache.train_heads.headspec import HeadDef, HeadSpec, Param, select_levels
from fcache.train_heads.segmentation.targets import ground_truth, to_canvas, to_original
from fcache.train_heads.segmentation.task import multi_view_name
from fcache.train_heads.task import Batch, TaskDef

SINGLE_VIEW = "ss"  # the metric family of view 0 (the plain view), as segmentation's single scale


COMMON: dict[str, Param] = {
    "min_depth": Param(0.001, kind="positive", help="the nearest depth predicted, metres (DINOv2: 0.001)"),
    "max_depth": Param(10.0, kind="positive", help="the farthest depth predicted, metres (DINOv2 on NYU-Depth v2: 10; KITTI: 80)"),
    "crop": Param("none", kind="choice", choices=M.CROPS, help="evaluation: nyu scores Eigen's crop of NYU's frames only"),
}


def _check(spec: HeadSpec) -> None:
    if spec["min_depth"] >= spec["max_depth"]:
        raise InputError(f"head {spec.name}: min_depth={spec['min_depth']} must be below max_depth={spec['max_depth']}")


def _linear(task: DepthTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    p = task.head
    return LinearDepth(levels, p["bins"], p["upsample"], p["min_depth"], p["max_depth"])


def _dpt(task: DepthTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    p = task.head
    return DPTDepth(levels, p["channels"], p["min_depth"], p["max_depth"])


HEADS: dict[str, HeadDef] = {
    "linear": HeadDef(
        {
            "levels": Param("last", kind="levels", help="stored levels, concatenated: last (the coarsest), all, or e.g. p4+p5"),
            "bins": Param(256, minimum=2, maximum=4096, help="depth bins, uniform over [min_depth, max_depth] (DINOv2: 256)"),
            "upsample": Param(4, maximum=32, help="bilinear upsampling of the finest level's grid before the 1x1 conv (DINOv2: 4)"),
            **COMMON,
        },
        _linear,
        check=_check,
    ),
    "dpt": HeadDef(
        {
            "levels": Param("all", kind="levels", help="stored levels, each a DPT stage: all, or e.g. p3+p4+p5; one: four stages of it"),
            "channels": Param(256, minimum=2, maximum=4096, help="width of the fusion blocks (DINOv2's DPT: 256)"),
            **COMMON,
        },
        _dpt,
        {"lr": 1e-4},
        check=_check,
    ),
}


def parse_depth_head(text: str) -> HeadSpec:
    return TASK.parse(text)


class DepthTask:
    """A depth head over cached features, trained with SigLoss and scored by NYU's RMSE at original resolution."""

    name: str = "depth"
    target_names: tuple[str, ...] = (Targets.DEPTH,)
    eval_target_names: tuple[str, ...] = target_names

    def __init__(self, head: HeadSpec) -> None:
        self.head = head

    @classmethod
    def from_store(cls, store: FeatureStore, head: str) -> DepthTask:
        check_store(store)
        return cls(parse_depth_head(head))

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> DepthTask:
        return cls(parse_depth_head(d["head"]))

    def describe(self) -> dict[str, Any]:
        return {"head": str(self.head)}

    def levels(self, available: Sequence[LevelSpec]) -> tuple[LevelSpec, ...]:
        return select_levels(self.head, available, minimum=1)

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module:
        return HEADS[self.head.name].build(self, levels)

    def targets(self, item: Mapping[str, Any], geometry: Geometry) -> Tensor:
        """(canvas, canvas) float32 metres of the item's view, 0 outside its content and where nothing was measured."""
        return torch.from_numpy(view_depth(np.asarray(item["targets"][Targets.DEPTH]), geometry))

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        truth = torch.stack(batch.targets)[:, None]  # (B, 1, S, S)
        pred = to_canvas(model(batch.features).float(), cast(Any, model).stride, truth.shape[-1])  # (B, 1, S, S)
        return {"loss_depth": sigloss(pred, truth)}

    def predict(self, model: nn.Module, batch: Batch) -> list[dict[str, Any]]:
        """Per sample: the view names, the depth map of the views' mean at original resolution as a 16-bit PNG
        (millimetres) and, when the item carries its ground truth, the scores of view 0 and of that mean (the ground
        truth is consumed from ``batch.raw`` here, so evaluation holds scores, not depth maps)."""
        feats = batch.features
        multi = next(iter(feats.values())).ndim == 5  # (B, V, C, H, W) from AllViews, else one view (B, C, H, W)
        views = [view_geometry(raw, g) for raw, g in zip(batch.raw, batch.geometry, strict=True)]
        names = [tuple(raw.pop(VIEW_NAMES, ("plain",))) for raw in batch.raw]
        head = cast(Any, model)
        maps: list[list[np.ndarray]] = [[] for _ in views]
        for v in range(len(views[0])):
            out = model({lv: x[:, v] if multi else x for lv, x in feats.items()}).float()  # (B, 1, h, w)
            for j, per_sample in enumerate(maps):
                depth = to_original(out[j], head.stride, views[j][v])[0].clamp(head.min_depth, head.max_depth)
                per_sample.append(depth.cpu().numpy())  # (orig_h, orig_w)
        results = []
        for nm, per_view, raw, g in zip(names, maps, batch.raw, batch.geometry, strict=True):
            mean = np.mean(per_view, axis=0)
            truth = raw.pop(Targets.DEPTH, None)
            scores = [] if truth is None else [self.scores(d, ground_truth(truth, g)) for d in (per_view[0], mean)[: 1 + (len(nm) > 1)]]
            results.append({"names": nm, "depth": depth_png(mean), "scores": scores})
        return results

    def scores(self, depth: np.ndarray, truth: np.ndarray) -> dict[str, Any] | None:
        return M.image_scores(depth, truth, crop=self.head["crop"], max_depth=self.head["max_depth"])

    def evaluate(self, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any], out: Path | None) -> dict[str, float]:
        """``ss/RMSE`` ... ``ss/d3`` of view 0 and, with test views, the same for their mean (``flip/...``, ``ms+flip/...``):
        each the mean over the images with a ground truth. Writes depth.json (the metrics and the per-range tables)
        and ``depth/<sample key>.png`` (the views' mean) into ``out``."""
        if not predictions:
            raise InputError("no sample to evaluate")
        names = predictions[0]["names"]
        families = [SINGLE_VIEW] + ([multi_view_name(names)] if len(names) > 1 else [])
        metrics: dict[str, float] = {}
        report: dict[str, Any] = {"views": list(names), "crop": self.head["crop"]}
        for k, family in enumerate(families):
            scores = [p["scores"][k] if p["scores"] else None for p in predictions]
            means, scored = M.mean_scores(scores)
            if not scored:
                raise InputError("no evaluated sample has a depth measurement (every ground-truth pixel is 0)")
            metrics |= {f"{family}/{m}": v for m, v in means.items()}
            report[family] = {"images": scored, **means, "ranges": M.range_table(scores, self.head["max_depth"])}
        if out is not None:
            write_json(Path(out) / DEPTH_JSON, report)
            write_depth_maps(Path(out) / DEPTH, raw, predictions)
        return metrics


def view_geometry(raw: dict[str, Any], g: Geometry) -> list[Geometry]:
    """The geometry of every view of an item (AllViews carries them in its targets), or its one view's."""
    stacked = raw.pop(VIEW_GEOMETRY, None)
    return [g] if stacked is None else [Geometry.from_array(np.asarray(a)) for a in stacked]


def write_depth_maps(folder: Path, raw: Sequence[Mapping[str, Any]], predictions: Sequence[Any]) -> None:
    """``depth/<sample key>.png``: each sample's predicted depth, 16-bit millimetres."""
    names = output_names([str(r.get(KEY, k)) for k, r in enumerate(raw)], "samples")
    folder.mkdir(parents=True, exist_ok=True)
    for name, p in zip(names, predictions, strict=True):
        (folder / f"{name}.png").write_bytes(p["depth"])


def check_store(store: FeatureStore) -> None:
    """The store can train or evaluate a depth head: image features with depth maps."""
    if store.video:
        raise InputError(f"{store.root} is a video store; --task depth needs image features with depth maps")
    if Targets.DEPTH not in store.target_names:
        kind = store.manifest.dataset.task or store.manifest.dataset.kind
        have = ", ".join(store.target_names) or "none"
        raise InputError(
            f"{store.root} has no '{Targets.DEPTH}' targets (it is a {kind} store with targets: {have}); "
            "--task depth needs a store extracted with --dataset depth-folder"
        )


def check_eval_store(task: DepthTask, store: FeatureStore) -> None:
    """``store`` can score ``task``'s head: image features with depth maps."""
    check_store(store)


TASK = TaskDef(
    "depth",
    HEADS,
    DepthTask,
    check_eval_store,
    "ss/RMSE",
    defaults={"lr": 1e-3, "weight_decay": 1e-4, "warmup": 200, "schedule": "cosine"},
    higher_is_better=False,
    eval_views="all",  # view 0 alone, and the mean of the test views (flip, ms) where the store has them
    metric_names=M.METRICS,
    percent=False,
    outputs=OUTPUTS,
    pictures=pictures,
    per_class=per_class,
    export=EXPORT,
    bench=BENCH,
)
