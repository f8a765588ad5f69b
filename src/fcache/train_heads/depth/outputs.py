"""What leaves fcache from a depth head: depth maps at original resolution (``fcache.load``: float32 metres,
``fcache predict``: 16-bit PNGs in millimetres), depth maps drawn in colour beside the image, pictures and the per-range
table of an evaluation, and the exported graph (depth on the canvas)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from fcache.spec import Targets
from fcache.store import FeatureStore
from fcache.train_heads.depth.maps import colour, depth_range, read_depth_png
from fcache.train_heads.pictures import LIMIT, enlarge, read_json
from fcache.train_heads.task import ExportDef, NamedInput, OutputOptions, Outputs, PerClass

DEPTH_JSON = "depth.json"  # the metrics and the per-range table, written into RUN/eval/<store> by evaluation
DEPTH = "depth"  # the folder of predicted depth PNGs (eval and predict outputs)


def present(task: Any, prediction: Mapping[str, Any], options: OutputOptions) -> Tensor:
    """(H, W) float32 metres at the input's resolution (to the millimetre, as the PNGs)."""
    return torch.from_numpy(read_depth_png(prediction["depth"]))


class DepthFiles:
    """``depth/<name>.png``: each input's depth map, 16-bit millimetres."""

    entries: tuple[str, ...] = (DEPTH,)

    def __init__(self, task: Any, out: Path, options: OutputOptions, view_names: Sequence[str]) -> None:
        self.folder = out / DEPTH

    def add(self, item: NamedInput, prediction: Any) -> None:
        self.folder.mkdir(exist_ok=True)
        (self.folder / f"{item.stem}.png").write_bytes(prediction["depth"])

    def finish(self) -> dict[str, Any]:
        return {"files": [str(self.folder)] if self.folder.is_dir() else []}


def truth(store: FeatureStore, index: int, raw: Mapping[str, Any]) -> np.ndarray:
    """The sample's stored depth map cut to its original size (metres, 0 = no measurement)."""
    g = store.geometry(index)
    return np.asarray(store.target(Targets.DEPTH, index))[: round(g.orig_h), : round(g.orig_w)]


def draw(task: Any, image: np.ndarray, prediction: Any, truth: Any, options: OutputOptions) -> np.ndarray:
    """The image, the predicted depth in colour and the ground truth's (when there is one) side by side, one scale."""
    from fcache.train_heads.drawing import enlarge as enlarged
    from fcache.train_heads.drawing import side_by_side

    pred = read_depth_png(prediction["depth"])
    near, far = depth_range(pred, truth)
    panels = [("image", image), (f"depth {near:.2f}-{far:.2f} m", colour(pred, near, far))]
    panels += [("ground truth", colour(truth, near, far))] if truth is not None else []
    return side_by_side([(title, enlarged(p)[0]) for title, p in panels])


def pictures(folder: Path) -> dict[str, np.ndarray]:
    """The first predicted depth maps in colour, each on its own scale."""
    out = {}
    for p in sorted((folder / DEPTH).rglob("*.png"))[:LIMIT]:
        depth = read_depth_png(p)
        out[f"depth/{p.relative_to(folder / DEPTH).with_suffix('')}"] = enlarge(colour(depth, *depth_range(depth)))
    return out


def per_class(folder: Path) -> PerClass:
    """d1 and AbsRel per range of true depth (depth.json), of view 0 and of the views' mean: how the head does near and far."""
    d = read_json(folder / DEPTH_JSON) or {}
    families = [f for f, v in d.items() if isinstance(v, dict) and "ranges" in v]
    return {
        f"{f} {m} per depth range": {r["range"]: r[m] for r in d[f]["ranges"] if r["pixels"]}
        for f in sorted(families, key=lambda f: (f != "ss", f))
        for m in ("d1", "AbsRel")
    }


def depth_on_canvas(head: nn.Module, features: dict[str, Tensor], canvas: int) -> Tensor:
    """(B, 1, S, S) metres on the canvas, clamped to the head's [min_depth, max_depth]."""
    from fcache.train_heads.segmentation.targets import to_canvas

    h = cast(Any, head)
    return to_canvas(head(features), h.stride, canvas).clamp(h.min_depth, h.max_depth)


OUTPUTS = Outputs(present, DepthFiles, truth, draw)
EXPORT = ExportDef("depth (B, 1, S, S) in metres on the canvas", depth_on_canvas)
