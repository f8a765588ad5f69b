"""``fcache export RUN --out FILE``: the run's frozen backbone + trained head (or the head alone) as an artifact that
loads without fcache.

Formats:
  - ``pt2`` (default): ``torch.export`` of a tensor-in, tensor-out module; ``torch.export.load(FILE).module()(...)``.
  - ``onnx``: the same graph through ``torch.onnx.export(dynamo=True)`` (needs ``pip install fcache[export]``);
    run it with onnxruntime.
  - ``safetensors``: every weight (``backbone.*`` under the key names of ``timm.create_model(<timm name>,
    features_only=True, out_indices=..., img_size=S, strict_img_size=False)``, so timm alone rebuilds the backbone;
    ``head.*`` the head's state dict), with the record as metadata. The head's code is fcache's: this format carries
    its weights and description, not a graph.

Every format also writes ``FILE.json``: the inputs and outputs of the graph, the preprocessing that makes its input
(resize the longest side to the canvas, bilinear; normalise with mean/std; pad bottom/right with zeros), the
classes, and the run's record. Shapes are fixed at export (batch ``--batch-size``, the run's canvas and frames).

What each task's graph computes after the features (``TaskDef.export``; ``--head-only``: ``features`` replaces
``images``, a dict level -> (B, C, H, W), video (B, T, C, H, W)):
  - classification: (images (B, 3, S, S), content (B, 2) = valid height and width of the image on the canvas) ->
    logits (B, K);
  - video: clips (B, T, 3, S, S) -> logits (B, K) (one clip x crop view; average the softmax over views yourself);
  - segmentation: images -> class scores (B, K, S, S) on the canvas (UPerNet: logits; Mask2Former: its semantic
    scores); crop the content, resize to the original size, argmax;
  - depth: images -> depth (B, 1, S, S) in metres on the canvas; crop the content, resize to the original size;
  - detection: images -> the neck's feature pyramid only (level -> (B, channels, H, W)). torchvision's RPN, RoI
    heads and NMS have data-dependent shapes that neither format captures here: for boxes and masks use the
    safetensors weights with fcache (``fcache.load``) or ``fcache predict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fcache.apps.config import FORMATS, ExportConfig
from fcache.common.errors import InputError
from fcache.common.outputs import check_outside
from fcache.train_heads.tasks import task_def

# the resize + pad of the plain view exactly as fcache extract renders it (extract.views.render), for images of (w, h)
RESIZE = (
    "s = canvas / max(w, h); rw, rh = max(1, round(w * s)), max(1, round(h * s)); PIL Image.resize((rw, rh), BILINEAR, "
    "box=(0, 0, min(w, rw / s), min(h, rh / s)), reducing_gap=None); x = (pixels / 255 - mean) / std; pad bottom/right with 0 "
    "to canvas x canvas; content = (rh, rw)"
)


@dataclass
class Parts:
    """What an export is made of: the run's record and head, the manifest of its inputs, the backbone (None: head-only)."""

    task: str
    record: Any
    head: nn.Module
    manifest: Any
    backbone: Any

    @classmethod
    def of(cls, cfg: ExportConfig) -> Parts:
        if cfg.head_only:  # no backbone to rebuild: the recorded store shapes say what the features are
            from fcache.apps.model import inference_manifest
            from fcache.train_heads.evaluation import load_head

            head = load_head(cfg.run)
            f = head.record.require_features()
            manifest = inference_manifest(f.backbone, f.preprocessing, f.dataset, (), None, None)
            return cls(head.task.name, head.record, head.model, manifest, None)
        from fcache.apps.model import TrainedModel

        model = TrainedModel.from_run(cfg.run, weights=cfg.weights, random_init=cfg.random_init, device="cpu")
        return cls(model.task.name, model.record, model.head, model.manifest, model.backbone_ref)


class Graph(nn.Module):
    """The exported computation of a run's task: backbone features (unless head-only), then the head and what its task
    makes of it (``TaskDef.export.forward``), tensors only."""

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.task = parts.task
        self.finish = task_def(parts.task).export.forward
        self.clips = parts.manifest.video
        self.head_only = parts.backbone is None
        self.backbone = None if parts.backbone is None else parts.backbone.model  # timm FeatureListNet
        self.nhwc = parts.backbone is not None and parts.backbone.nhwc
        self.all_levels = [lv.name for lv in parts.manifest.backbone.levels]
        self.levels = [lv.name for lv in parts.record.levels]
        self.head = parts.head
        self.canvas = int(parts.manifest.backbone.input_size)

    def features(self, images: Tensor) -> dict[str, Tensor]:
        assert self.backbone is not None
        outs = self.backbone(images)
        feats = {n: (f.permute(0, 3, 1, 2) if self.nhwc else f).contiguous() for n, f in zip(self.all_levels, outs, strict=True)}
        return {n: feats[n] for n in self.levels}  # level -> (B, C, H, W)

    def forward(self, x: Any, *extra: Tensor) -> Any:
        if self.clips and not self.head_only:
            b, t = x.shape[:2]
            feats = {n: f.reshape(b, t, *f.shape[1:]) for n, f in self.features(x.flatten(0, 1)).items()}  # (B, T, C, H, W)
        else:
            feats = x if self.head_only else self.features(x)
        return self.finish(self.head, {n: feats[n] for n in self.levels}, self.canvas, *extra)


def example_inputs(parts: Parts, batch: int) -> tuple[Any, ...]:
    """Inputs of the graph's shape: zeros images (or features), then the task's own inputs (classification: the full
    canvas as content)."""
    m = parts.manifest
    s = int(m.backbone.input_size)
    frames = int(m.preprocessing.frames or 1)
    if parts.backbone is None:
        x: Any = {}
        for lv in parts.record.levels:
            shape = m.level_shape(lv.name)  # (C, H, W) or (T, C, H, W)
            x[lv.name] = torch.zeros(batch, *shape)
    else:
        x = torch.zeros(batch, frames, 3, s, s) if m.video else torch.zeros(batch, 3, s, s)
    return (x, *task_def(parts.task).export.inputs(batch, s).values())


def config_of(parts: Parts, cfg: ExportConfig, graph: Graph) -> dict[str, Any]:
    """What ``FILE.json`` holds."""
    m, record, bb, task = parts.manifest, parts.record, parts.backbone, parts.task
    s = int(m.backbone.input_size)
    inputs: dict[str, Any] = {"features": {lv.name: [cfg.batch_size, *m.level_shape(lv.name)] for lv in record.levels}}
    if not cfg.head_only:
        shape = [cfg.batch_size, int(m.preprocessing.frames or 1), 3, s, s] if m.video else [cfg.batch_size, 3, s, s]
        inputs = {"images": shape}
    export = task_def(task).export
    inputs |= {name: list(t.shape) for name, t in export.inputs(cfg.batch_size, s).items()}
    return {
        "format": cfg.format,
        "task": task,
        "head": record.head,
        "head_only": cfg.head_only,
        "inputs": inputs,
        "outputs": export.outputs,
        "preprocessing": {
            "canvas": int(m.backbone.input_size),
            "resize": RESIZE,
            "mean": list(m.preprocessing.mean),
            "std": list(m.preprocessing.std),
            "video": _video(m.preprocessing) if m.video else None,
        },
        "backbone": {
            "timm_name": m.backbone.timm_name,
            "create": None
            if bb is None
            else {
                "features_only": True,
                "out_indices": list(bb.model.feature_info.out_indices),
                "img_size": int(m.backbone.input_size),
                "strict_img_size": False,
            },  # fmt: skip
            "levels": [lv.to_dict() for lv in m.backbone.levels],
            "nhwc": None if bb is None else bool(bb.nhwc),
            "weights": m.backbone.weights,
        },
        "head_levels": graph.levels,
        "classes": record.task.get("label_names") or record.task.get("categories"),
        "record": record.to_dict(),
    }


def config_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.json")


def check_out(cfg: ExportConfig) -> None:
    """``--out`` never lands on a RUN's files nor on a file of the user's: it lies outside RUN, and FILE and FILE.json
    are new or an earlier export's (FILE.json holding its config), which a rerun replaces."""
    out = Path(cfg.out)
    check_outside(out, "--out", [(cfg.run, "the RUN folder")])
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the file to write")
    if not (out.exists() or config_path(out).exists()):
        return
    try:
        earlier = json.loads(config_path(out).read_text())
        ours = isinstance(earlier, dict) and earlier.get("format") in FORMATS and "record" in earlier and "preprocessing" in earlier
    except (OSError, ValueError):
        ours = False
    if not ours:
        held = config_path(out) if config_path(out).exists() else out
        raise InputError(f"--out {out}: {held} exists and is not an earlier fcache export (no export config beside it); give a new path")


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the artifact and its JSON config (each whole or not at all); returns a summary."""
    from fcache.common.files import atomic_file, check_writable

    check_out(cfg)
    check_writable(cfg.out, "--out", folder=False)
    parts = Parts.of(cfg)
    graph = Graph(parts).eval()
    out = Path(cfg.out)
    config = config_of(parts, cfg, graph)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.format == "safetensors":
        with atomic_file(out) as tmp:
            _safetensors(graph, tmp, config)
    else:
        args = example_inputs(parts, cfg.batch_size)
        with torch.inference_mode():
            program = torch.export.export(graph, args, strict=False)
        if cfg.format == "pt2":
            with atomic_file(out) as tmp:
                torch.export.save(program, str(tmp))
        else:  # in place: a graph over 2 GB keeps its weights in FILE.data, named after the file it is written as
            _onnx(program, out, config)
    with atomic_file(config_path(out)) as tmp:
        tmp.write_text(json.dumps(config, indent=1) + "\n")
    return {"run": cfg.run, "task": parts.task, "format": cfg.format, "out": str(out), "config": str(config_path(out)),
            "outputs": config["outputs"]}  # fmt: skip


def _video(p: Any) -> dict[str, Any]:
    return {"frames": p.frames, "clips": p.clips, "crops": p.crops, "resize": "short side to the canvas; crops along the long side"}


def _onnx(program: Any, out: Path, config: dict[str, Any]) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise InputError("--format onnx needs onnx and onnxscript: pip install 'fcache[export]'") from None
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    assert onnx_program is not None
    onnx_program.save(str(out))
    config["onnx_inputs"] = [i.name for i in onnx_program.model.graph.inputs]
    config["onnx_outputs"] = [o.name for o in onnx_program.model.graph.outputs]


def _safetensors(graph: Graph, out: Path, config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    weights = {f"head.{k}": v.detach().cpu().contiguous() for k, v in graph.head.state_dict().items()}
    if graph.backbone is not None:
        weights |= {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in graph.backbone.state_dict().items()}
    save_file(weights, str(out), metadata={"fcache.export": json.dumps(config, sort_keys=True)})
