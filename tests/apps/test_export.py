"""`fcache export`: each artifact loads in a fresh process that cannot import fcache, and gives what fcache gives on the
same input (`fcache.load` end to end for the classification probe, from the image file and the JSON config alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fcache
from fcache.cli import main
from fcache.train_heads.evaluation import load_head
from helpers import refused

sys.path.insert(0, str(Path(__file__).parents[1] / "train_heads"))
from dethelpers import build_detection_store  # noqa: E402
from seghelpers import make_ade  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),  # pycocotools
]
BACKBONE = ["--model", "swinv2-t", "--random-init", "--input-size", "128", "--dtype", "fp32", "--num-workers", "0", "--device", "cpu"]
CPU = ["--num-workers", "0", "--device", "cpu"]

# Runs without fcache (importing it fails): the image made into the graph's input from FILE.json's preprocessing alone.
FRESH = r"""
import json, sys
sys.modules["fcache"] = None  # any import of fcache now fails
import numpy as np, torch
from PIL import Image
fmt, artifact, inputs_path, out_path = sys.argv[1:]
cfg = json.loads(open(artifact + ".json").read())
inputs = torch.load(inputs_path)
if "image" in inputs:  # preprocessing as FILE.json says
    p = cfg["preprocessing"]
    S, mean, std = p["canvas"], torch.tensor(p["mean"])[:, None, None], torch.tensor(p["std"])[:, None, None]
    im = Image.open(inputs["image"]).convert("RGB")
    w, h = im.size
    s = S / max(w, h)
    rw, rh = max(1, round(w * s)), max(1, round(h * s))
    im = im.resize((rw, rh), Image.Resampling.BILINEAR, box=(0, 0, min(w, rw / s), min(h, rh / s)), reducing_gap=None)
    x = torch.zeros(1, 3, S, S)
    x[0, :, :rh, :rw] = (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - mean) / std
    args = [x, torch.tensor([[float(rh), float(rw)]])]
else:
    args = inputs["args"]
if fmt == "pt2":
    with torch.no_grad():
        out = torch.export.load(artifact).module()(*args)
elif fmt == "onnx":
    import onnxruntime
    from torch.utils._pytree import tree_flatten
    flat = [a.numpy() for a in tree_flatten(args)[0]]
    sess = onnxruntime.InferenceSession(artifact)
    res = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], flat)))
    out = torch.from_numpy(res[0]) if len(res) == 1 else [torch.from_numpy(r) for r in res]
else:  # safetensors: the backbone with timm alone, the linear probe from its weights and FILE.json's description
    import timm
    from safetensors.torch import load_file
    w = load_file(artifact)
    b = cfg["backbone"]
    net = timm.create_model(b["timm_name"], pretrained=False, **b["create"]).eval()
    net.load_state_dict({k[9:]: v for k, v in w.items() if k.startswith("backbone.")}, strict=True)
    with torch.no_grad():
        feats = [f.permute(0, 3, 1, 2) if b["nhwc"] else f for f in net(args[0])]
    level = [lv["name"] for lv in b["levels"]].index(cfg["head_levels"][0])
    f, stride = feats[level], b["levels"][level]["stride"]
    ch, cw = int(-(-args[1][0, 0] // stride)), int(-(-args[1][0, 1] // stride))
    pooled = f[:, :, :ch, :cw].mean((2, 3))
    out = pooled @ w["head.classifier.fc.weight"].T + w["head.classifier.fc.bias"]
assert not any(m == "fcache" or m.startswith("fcache.") for m in sys.modules if sys.modules[m] is not None)
torch.save(out, out_path)
"""


def fresh(fmt: str, artifact: Path, inputs: dict, tmp: Path):
    """The artifact's output on ``inputs`` computed in a fresh Python that cannot import fcache."""
    torch.save(inputs, tmp / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", FRESH, fmt, str(artifact), str(tmp / "inputs.pt"), str(tmp / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def export(run: Path, out: Path, fmt: str, *flags: str) -> dict:
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--format", fmt, *flags, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "safetensors"])
def test_probe_exports_give_fcache_loads_probabilities(probe_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    run, image = probe_run.run, sorted(probe_run.images.rglob("*.jpg"))[0]
    summary = export(run, tmp_path / f"probe.{fmt}", fmt, "--random-init")
    config = json.loads(Path(summary["config"]).read_text())
    assert config["task"] == "classification" and config["classes"] == ["cats", "dogs"]
    want = fcache.load(run, random_init=True)([image])[0]["probs"]
    got = fresh(fmt, Path(summary["out"]), {"image": str(image)}, tmp_path).softmax(-1)[0]
    assert float((got - want).abs().max()) <= 1e-4, (got, want)
    assert (Path(summary["out"]).stat().st_mode & 0o044) == 0o044  # readable by group and others (as the umask allows)


@pytest.fixture(scope="module")
def upernet(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("upernet")
    root = make_ade(d / "ADE", "validation", n=2)
    cli("extract", "--dataset", "ade20k", "--root", str(root), "--split", "validation", *BACKBONE, "--out", str(d / "s.zarr"))
    cli("train-head", "--store", str(d / "s.zarr"), "--task", "segmentation", "--head", "upernet:channels=64", "--out", str(d / "run"),
        "--iters", "2", "--batch-size", "2", *CPU)  # fmt: skip
    return d / "run"


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_segmentation_head_exports_give_the_heads_scores(upernet, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    from fcache.train_heads.segmentation.targets import to_canvas

    summary = export(upernet, tmp_path / f"seg.{fmt}", fmt, "--head-only", "--batch-size", "2")
    shapes = json.loads(Path(summary["config"]).read_text())["inputs"]["features"]
    feats = {lv: torch.randn(*shape, generator=torch.Generator().manual_seed(k)) for k, (lv, shape) in enumerate(shapes.items())}
    head = load_head(upernet).model
    with torch.no_grad():
        want = to_canvas(head(feats)["logits"], head.stride, 128)  # (2, 150, 128, 128)
    got = fresh(fmt, Path(summary["out"]), {"args": [feats]}, tmp_path)
    assert got.shape == want.shape == (2, 150, 128, 128) and float((got - want).abs().max()) <= 1e-4


def test_detection_exports_the_neck_and_says_so(tmp_path):
    store = build_detection_store(tmp_path / "det.zarr")
    cli("train-head", "--store", str(store), "--head", "fpn:channels=8,rois=8,rpn_batch=8", "--out", str(tmp_path / "run"), "--iters", "1",
        "--batch-size", "1", *CPU)  # fmt: skip
    summary = export(tmp_path / "run", tmp_path / "det.pt2", "pt2", "--head-only")
    assert "no RPN / RoI heads / NMS" in summary["outputs"]
    shapes = json.loads(Path(summary["config"]).read_text())["inputs"]["features"]
    feats = {lv: torch.randn(*shape) for lv, shape in shapes.items()}
    with torch.no_grad():
        want = load_head(tmp_path / "run").model.neck(feats)
    got = fresh("pt2", Path(summary["out"]), {"args": [feats]}, tmp_path)
    assert set(got) == set(want) and all(np.allclose(got[k].numpy(), want[k].numpy(), atol=1e-5) for k in want)


def test_export_never_lands_on_the_runs_files_nor_on_a_file_of_the_users(probe_run, tmp_path):
    run = probe_run.run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = ["export", str(run), "--format", "safetensors", "--head-only", "--out"]
    for name in ("model.safetensors", "config.json", "probe.safetensors"):
        refused(CliRunner().invoke(main, [*args, str(run / name)]), f"--out {run / name}", "RUN folder")
    mine, theirs = tmp_path / "mine.safetensors", tmp_path / "theirs.safetensors"
    mine.write_bytes(b"mine")
    (tmp_path / "theirs.safetensors.json").write_text("{}")
    refused(CliRunner().invoke(main, [*args, str(mine)]), "not an earlier fcache export")
    refused(CliRunner().invoke(main, [*args, str(theirs)]), "theirs.safetensors.json", "not an earlier fcache export")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before and mine.read_bytes() == b"mine"
    assert not theirs.exists() and (tmp_path / "theirs.safetensors.json").read_text() == "{}"
    first = export(run, tmp_path / "e.safetensors", "safetensors", "--head-only")
    assert export(run, tmp_path / "e.safetensors", "safetensors", "--head-only") == first  # a rerun replaces its own export
