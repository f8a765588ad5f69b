"""What leaves fcache from a segmentation head: label maps at original resolution (``fcache.load``: class indices,
``fcache predict``: indexed PNGs with the class palette), label maps drawn over the image, pictures and per-class IoU of
an evaluation, and the exported graph (class scores on the canvas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fcache.spec import Targets
from fcache.store import FeatureStore
from fcache.train_heads.pictures import LIMIT, enlarge, read_json
from fcache.train_heads.segmentation.labelmaps import read_label_png
from fcache.train_heads.task import ExportDef, NamedInput, OutputOptions, Outputs, PerClass

SEGMENTATION_JSON = "segmentation.json"  # per-class IoU and accuracy, written into RUN/eval/<store> by evaluation
LABELS = "labels"  # the folder of predicted label maps (indexed PNGs at original resolution), in eval and predict outputs


def present(task: Any, prediction: Mapping[str, Any], options: OutputOptions) -> Tensor:
    """(H, W) int64 class indices at the input's resolution."""
    return torch.from_numpy(read_label_png(prediction["labels"]).astype(np.int64))


class LabelFiles:
    """``labels/<name>.png``: each input's label map."""

    entries: tuple[str, ...] = (LABELS,)

    def __init__(self, task: Any, out: Path, options: OutputOptions, view_names: Sequence[str]) -> None:
        self.folder = out / LABELS

    def add(self, item: NamedInput, prediction: Any) -> None:
        self.folder.mkdir(exist_ok=True)
        (self.folder / f"{item.stem}.png").write_bytes(prediction["labels"])

    def finish(self) -> dict[str, Any]:
        return {"files": [str(self.folder)] if self.folder.is_dir() else []}


def truth(store: FeatureStore, index: int, raw: Mapping[str, Any]) -> np.ndarray:
    """The sample's stored label map cut to its original size."""
    g = store.geometry(index)
    return np.asarray(store.target(Targets.SEGMENTATION, index))[: round(g.orig_h), : round(g.orig_w)]


def draw(task: Any, image: np.ndarray, prediction: Any, truth: Any, options: OutputOptions) -> np.ndarray:
    """The label map over the image with a legend; the ground truth's beside it when there is one."""
    from fcache.train_heads.drawing import side_by_side
    from fcache.train_heads.segmentation.draw import draw_labels

    picture = draw_labels(image, read_label_png(prediction["labels"]), task.label_names)
    if truth is None:
        return picture
    return side_by_side([("prediction", picture), ("ground truth", draw_labels(image, truth, task.label_names))])


def pictures(folder: Path) -> dict[str, np.ndarray]:
    """The first predicted label maps, in the class palette."""
    files = sorted((folder / LABELS).rglob("*.png"))[:LIMIT]
    return {f"labels/{p.relative_to(folder / LABELS).with_suffix('')}": enlarge(np.asarray(Image.open(p).convert("RGB"))) for p in files}


def per_class(folder: Path) -> PerClass:
    """IoU of each class, single scale first, then over the test views (segmentation.json)."""
    d = read_json(folder / SEGMENTATION_JSON) or {}
    families = {("ss" if k == "single_scale" else k): v for k, v in d.items() if isinstance(v, dict) and "classes" in v}
    return {
        f"{f} IoU per class": {c["class"]: c["IoU"] for c in families[f]["classes"]} for f in sorted(families, key=lambda f: (f != "ss", f))
    }


def scores(head: nn.Module, features: dict[str, Tensor], canvas: int) -> Tensor:
    """(B, K, S, S) class scores on the canvas: UPerNet's logits; Mask2Former's semantic scores (class x mask)."""
    from fcache.train_heads.segmentation.targets import to_canvas

    out = head(features)
    stride = int(cast(Any, head).stride)
    if "masks" not in out:  # UPerNet: logits at the finest stride
        return to_canvas(out["logits"], stride, canvas)
    cls = out["logits"][-1].float().softmax(-1)[..., :-1]  # (B, Q, K)
    masks = to_canvas(out["masks"][-1].float(), stride, canvas).sigmoid()  # (B, Q, S, S)
    return torch.einsum("bqc,bqhw->bchw", cls, masks)


OUTPUTS = Outputs(present, LabelFiles, truth, draw)
EXPORT = ExportDef("class scores (B, K, S, S) on the canvas", scores)
