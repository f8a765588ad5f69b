"""The demo: its dataset's boxes and masks are exact, and a tiny run writes a complete report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fcache.apps.demo import COLORS, DemoConfig, make_image, run_demo


@pytest.mark.parametrize("seed", range(6))
def test_pasted_shapes_have_exact_boxes_and_masks(seed):
    rng = np.random.default_rng(seed)
    img, anns = make_image(Image.new("RGB", (400, 300), (128, 128, 128)), rng, 1, 256)
    pixels = np.asarray(img)

    def raster(ann):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img.height, img.width))).astype(bool)

    top = anns[-1]  # painted last: nothing covers it
    mask = raster(top)
    painted = (pixels == COLORS[top["category_id"]]).all(-1)
    same_colour = np.any([raster(a) for a in anns if a["category_id"] == top["category_id"]], axis=0)
    assert (mask & painted).sum() / mask.sum() > 0.95  # the polygon is painted (two rasterisers: edges may differ)
    assert (painted & same_colour).sum() / painted.sum() > 0.95  # and nothing outside the polygons is
    x, y, w, h = top["bbox"]
    ys, xs = np.nonzero(mask)
    assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
    assert top["area"] == pytest.approx(mask.sum(), rel=0.1)


def test_tiny_demo_writes_a_report(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), train_images=6, val_images=3, input_size=128, iters=2, batch_size=2,
                     head="bifpn:layers=1,channels=32,rois=16,rpn_batch=32", num_workers=0)  # fmt: skip
    m = run_demo(cfg, say=lambda s: None)
    report = tmp_path / "demo" / "report"
    assert {p.name for p in report.iterdir()} == {"metrics.json", "loss.png", "predictions.png"}
    assert json.loads((report / "metrics.json").read_text()) == m
    for which in ("untrained", "trained"):
        assert 0 <= m[which]["box/AP50"] <= 1 and 0 <= m[which]["mask/AP50"] <= 1
    assert m["trainable_params"] > 0 and m["timings"]["total_s"] > 0
    val = json.loads((tmp_path / "demo" / "data" / "val" / "annotations.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in val["images"]}
    for d in json.loads((tmp_path / "demo" / "run" / "eval" / "val" / "detections.json").read_text()):
        w, h = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert x >= -0.5 and x + bw <= w + 0.5 and y >= -0.5 and y + bh <= h + 0.5  # original image coordinates
    assert Image.open(report / "predictions.png").size[0] == 3 * 512


def test_an_out_folder_holding_other_files_is_refused_and_kept(tmp_path):
    from click.testing import CliRunner

    from fcache.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "run").mkdir()
    r = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert r.exit_code == 2 and "holds files the demo did not write (thesis.tex)" in r.output, r.output
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "run").is_dir()
