"""Depth metrics against hand-computed values, SigLoss and the linear probe's bins as DINOv2 defines them, the DPT
decoder's shapes over any stored levels, head specs, and the depth task's targets and predictions on a synthetic store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fcache.spec import Geometry, LevelSpec
from fcache.train_heads.depth import metrics as M
from fcache.train_heads.depth.dpt import DPTDepth
from fcache.train_heads.depth.linear import LinearDepth, bins_to_depth, sigloss
from fcache.train_heads.depth.maps import depth_png, read_depth_png, view_depth
from fcache.train_heads.depth.task import TASK, DepthTask
from fcache.train_heads.headspec import select_levels
from fcache.train_heads.tasks import TASKS, task_defaults

LEVELS = (LevelSpec("p2", 8, 4), LevelSpec("p3", 16, 8), LevelSpec("p4", 24, 16), LevelSpec("p5", 32, 32))


def test_metrics_against_hand_computed_values():
    truth = np.array([[1.0, 2.0], [4.0, 0.0]])  # one pixel without a measurement
    pred = np.array([[1.1, 1.5], [4.0, 9.0]])
    s = M.image_scores(pred, truth)
    # valid pixels: (1.1, 1), (1.5, 2), (4, 4)
    assert s["RMSE"] == pytest.approx(math.sqrt((0.1**2 + 0.5**2 + 0) / 3))
    assert s["AbsRel"] == pytest.approx((0.1 / 1 + 0.5 / 2 + 0) / 3)
    assert s["log10"] == pytest.approx((abs(math.log10(1.1)) + abs(math.log10(0.75)) + 0) / 3)
    # max(d/d*, d*/d): 1.1, 1.333, 1.0 -> d1 counts 2 of 3; 1.333 < 1.5625: d2 and d3 all three
    assert (s["d1"], s["d2"], s["d3"]) == (pytest.approx(2 / 3), 1.0, 1.0)
    assert M.image_scores(pred, np.zeros_like(truth)) is None  # nothing measured: no score
    means, n = M.mean_scores([s, None, {**s, "RMSE": 0.0}])
    assert n == 2 and means["RMSE"] == pytest.approx(s["RMSE"] / 2)  # the mean over images, not pixels


def test_per_range_counts_and_the_nyu_crop():
    truth = np.array([[0.5, 1.5, 2.5, 12.0]])
    pred = np.array([[0.5, 3.0, 2.5, 12.0]])
    s = M.image_scores(pred, truth, max_depth=10.0)
    rows = M.range_table([s, None], max_depth=10.0)
    assert [r["range"] for r in rows] == ["0-2 m", "2-4 m", "4-6 m", "6-8 m", "8-10 m", ">10 m"]
    assert [r["pixels"] for r in rows] == [2, 1, 0, 0, 0, 1]
    assert rows[0]["d1"] == 0.5 and rows[0]["AbsRel"] == pytest.approx(0.5) and rows[2]["d1"] is None
    mask = M.crop_mask(480, 640, "nyu")
    assert mask.sum() == (471 - 45) * (601 - 41) and mask[45, 41] and not mask[44, 41] and not mask[45, 601]
    assert M.crop_mask(240, 320, "nyu").sum() == (236 - 22) * (300 - 20) and M.crop_mask(5, 5, "none").all()


def test_sigloss_and_the_linear_bins_as_dinov2():
    pred, truth = torch.tensor([[1.0, 2.0, 3.0, 5.0]]), torch.tensor([[1.5, 2.0, 0.0, 4.0]])
    g = torch.log(pred[truth > 0] + 1e-3) - torch.log(truth[truth > 0] + 1e-3)
    want = 10 * torch.sqrt(g.var() + 0.15 * g.mean() ** 2)
    assert float(sigloss(pred, truth)) == pytest.approx(float(want))
    assert float(sigloss(pred, truth * 0)) == 0.0  # no measurement: no loss, still a graph
    logits = torch.tensor([[-1.0, 0.4, 1.9]])[..., None, None]  # (1, 3, 1, 1)
    p = torch.tensor([0.0, 0.4, 1.9]) + 0.1
    bins = torch.linspace(1.0, 3.0, 3)
    assert float(bins_to_depth(logits, bins)) == pytest.approx(float((p / p.sum() * bins).sum()))


@pytest.mark.parametrize(
    ("head", "levels", "stride"),
    [("linear", LEVELS[3:], 8), ("linear", LEVELS, 1), ("dpt", LEVELS, 1), ("dpt", LEVELS[1::2], 2), ("dpt", LEVELS[3:], 2)],
)
def test_heads_predict_depth_in_range_at_their_stride(head, levels, stride):
    torch.manual_seed(0)
    spec = TASK.parse(f"{head}:min_depth=0.5,max_depth=5" + (",channels=16" if head == "dpt" else ""))
    model = TASK.heads[head].build(DepthTask(spec), levels)
    feats = {lv.name: torch.randn(2, lv.channels, 64 // lv.stride, 64 // lv.stride) for lv in levels}
    out = model(feats)
    assert (
        isinstance(model, LinearDepth if head == "linear" else DPTDepth)
        and model.stride == stride
        and out.shape == (2, 1, 64 // stride, 64 // stride)
    )
    assert (out >= 0.5 - 1e-5).all() and (head == "dpt" or (out <= 5 + 1e-5).all())
    assert (model.min_depth, model.max_depth) == (0.5, 5.0)  # what prediction clamps to
    assert float((out > 0.5 + 1e-3).float().mean()) > 0.9  # starts above min_depth: a ReLU'd depth at 0 gets no gradient


def test_head_specs_levels_and_defaults():
    t = DepthTask(TASK.parse("linear"))
    assert str(t.head) == "linear:bins=256,crop=none,levels=last,max_depth=10.0,min_depth=0.001,upsample=4"
    assert [lv.name for lv in t.levels(LEVELS)] == ["p5"]  # the last stored level
    assert [lv.name for lv in t.levels(LEVELS[:3])] == ["p4"]
    with pytest.raises(ValueError, match="needs at least 2 feature levels and gets only p5"):  # 'last' is any head's
        select_levels(TASKS["segmentation"].parse("upernet:levels=last"), LEVELS)
    assert [lv.name for lv in DepthTask(TASK.parse("dpt:levels=p3+p5")).levels(LEVELS)] == ["p3", "p5"]
    assert DepthTask.from_description(t.describe()).head == t.head
    with pytest.raises(ValueError, match="min_depth=5.0 must be below max_depth=2.0"):
        TASK.parse("dpt:min_depth=5,max_depth=2")
    with pytest.raises(ValueError, match="max_depth='far' is not a number"):
        TASK.parse("linear:max_depth=far")
    with pytest.raises(ValueError, match="min_depth=-1.0 must be a positive number"):
        TASK.parse("linear:min_depth=-1")
    with pytest.raises(ValueError, match="upsample=3 must divide the finest level's stride 32"):
        TASK.heads["linear"].build(DepthTask(TASK.parse("linear:upsample=3")), LEVELS[3:])
    assert task_defaults("depth", "dpt")["lr"] == 1e-4 and task_defaults("depth", "linear")["lr"] == 1e-3
    assert TASK.main_metric == "ss/RMSE" and not TASK.higher_is_better and not TASK.percent


def test_targets_follow_the_view_and_predictions_map_back():
    depth = np.zeros((70, 90), np.float32)
    depth[:60, :80] = np.linspace(1.0, 3.0, 80)[None]  # (orig 60 x 80, padded)
    flip = Geometry(orig_h=60, orig_w=80, scale=0.8, valid_h=48, valid_w=64, canvas=64, flip=1)
    v = view_depth(depth, flip)
    assert v.dtype == np.float32 and v.shape == (64, 64) and (v[48:] == 0).all()
    assert v[0, 0] > v[0, 63 - 16] > 0  # mirrored: the far right of the image first
    png = depth_png(np.array([[1.2344, 70.0], [0.0, 2.5]]))
    assert np.round(read_depth_png(png) * 1000).tolist() == [[1234, 65535], [0, 2500]]  # millimetres, clipped
