"""Mask2Former's parts against slow, obvious references: deformable attention, Hungarian matching, point sampling, losses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcache.train_heads.segmentation.criterion import (
    CLASS_WEIGHT,
    DICE_WEIGHT,
    MASK_WEIGHT,
    NO_OBJECT_WEIGHT,
    assign,
    class_loss,
    hungarian_match,
    matching_cost,
    uncertain_points,
)
from fcache.train_heads.segmentation.deform_attn import MSDeformAttn, ms_deform_attn

pytestmark = pytest.mark.usefixtures("one_thread")


def bilinear(img: np.ndarray, x: float, y: float) -> float:
    """Value of a (H, W) map at normalised (x, y), pixel centres at (i + 0.5) / size, zero outside (grid_sample's rule)."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            total += (1 - abs(px - xx)) * (1 - abs(py - yy)) * img[yy, xx]
    return total


def test_deformable_attention_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    n, m, d, lq, p = 2, 2, 3, 5, 3
    shapes = [(3, 4), (2, 2), (1, 3)]
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, generator=g, dtype=torch.float64)
    locations = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside [0, 1]
    weights = torch.rand(n, lq, m, len(shapes) * p, generator=g, dtype=torch.float64).softmax(-1).view(n, lq, m, len(shapes), p)
    got = ms_deform_attn(value, shapes, locations, weights)
    assert got.shape == (n, lq, m * d)

    want = np.zeros((n, lq, m, d))
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    v = value.numpy()
    for b, q, head, lvl, k, c in itertools.product(range(n), range(lq), range(m), range(len(shapes)), range(p), range(d)):
        h, w = shapes[lvl]
        img = v[b, starts[lvl] : starts[lvl + 1], head, c].reshape(h, w)
        x, y = locations[b, q, head, lvl, k].tolist()
        want[b, q, head, c] += weights[b, q, head, lvl, k].item() * bilinear(img, x, y)
    np.testing.assert_allclose(got.numpy(), want.reshape(n, lq, m * d), rtol=1e-10, atol=1e-12)


def test_deformable_attention_starts_on_rings_with_uniform_weights():
    attn = MSDeformAttn(16, levels=2, heads=4, points=3)
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(offsets[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))  # head 0 looks right
    torch.testing.assert_close(offsets[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)  # head 1 down
    query, value = torch.randn(1, 6, 16), torch.randn(1, 3 * 3 + 2 * 2, 16)
    out = attn(query, torch.rand(1, 6, 2, 2), value, [(3, 3), (2, 2)])
    assert out.shape == (1, 6, 16) and torch.isfinite(out).all()


def cost_reference(logits, masks, classes, tmasks):
    """2 x class + 5 x mean BCE + 5 x dice, from the definitions, every prediction against every target, on all pixels."""
    prob = torch.softmax(torch.as_tensor(logits), -1).numpy()
    q, n = len(logits), len(classes)
    cost = np.zeros((q, n))
    for i, j in itertools.product(range(q), range(n)):
        x, t = masks[i].ravel(), tmasks[j].ravel()
        s = 1 / (1 + np.exp(-x))
        bce = -(t * np.log(s) + (1 - t) * np.log(1 - s)).mean()
        dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
        cost[i, j] = CLASS_WEIGHT * -prob[i, classes[j]] + MASK_WEIGHT * bce + DICE_WEIGHT * dice
    return cost


@pytest.mark.parametrize("case", range(12))
def test_hungarian_matching_equals_brute_force(case):
    rng = np.random.default_rng(case)
    q, n, k, size = int(rng.integers(2, 6)), int(rng.integers(1, 4)), 4, 6
    n = min(n, q)
    logits = rng.normal(0, 2, (q, k + 1))
    masks = rng.normal(0, 3, (q, size, size))
    classes = rng.choice(k, n, replace=False)
    tmasks = (rng.random((n, size, size)) < 0.4).astype(np.float64)
    ys, xs = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    points = torch.as_tensor(np.stack([xs.ravel(), ys.ravel()], 1))  # every pixel centre: sampling is exact
    cost = matching_cost(torch.as_tensor(logits), torch.as_tensor(masks), (torch.as_tensor(classes), torch.as_tensor(tmasks)), points)
    want = cost_reference(logits, masks, classes, tmasks)
    np.testing.assert_allclose(cost.numpy(), want, rtol=1e-9, atol=1e-9)

    rows, cols = assign(cost)
    best = min(itertools.permutations(range(q), n), key=lambda perm: sum(want[perm[j], j] for j in range(n)))
    assert sorted(zip(cols.tolist(), rows.tolist(), strict=True)) == list(enumerate(best))


def test_matching_gives_every_target_one_prediction():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 7, 5), torch.randn(2, 7, 8, 8)
    targets = [
        (torch.tensor([0, 3, 2]), (torch.rand(3, 32, 32) > 0.5).float()),
        (torch.empty(0, dtype=torch.int64), torch.zeros(0, 32, 32)),
    ]
    (p0, t0), (p1, t1) = hungarian_match(logits, masks, targets, num_points=200)
    assert sorted(t0.tolist()) == [0, 1, 2] and len(set(p0.tolist())) == 3 and len(p1) == len(t1) == 0


def test_importance_sampling_picks_the_uncertain_region():
    logits = torch.full((3, 1, 16, 16), 8.0)
    logits[:, :, :, :4] = 0.0  # uncertain only in the left quarter
    torch.manual_seed(0)
    points = uncertain_points(logits, num_points=400)
    assert points.shape == (3, 400, 2)
    share_left = (points[:, :, 0] < 0.25).float().mean(1)
    assert (share_left >= 0.75).all(), share_left  # 75% by importance, plus a quarter of the uniform rest


def test_class_loss_weighs_no_object_by_a_tenth():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3)  # 4 queries, 2 classes + no-object
    targets = [(torch.tensor([1]), torch.zeros(1, 4, 4))]
    matches = [(torch.tensor([2]), torch.tensor([0]))]
    labels = torch.tensor([2, 2, 1, 2])
    ce = F.cross_entropy(logits[0], labels, reduction="none")
    w = torch.tensor([NO_OBJECT_WEIGHT, NO_OBJECT_WEIGHT, 1.0, NO_OBJECT_WEIGHT])
    torch.testing.assert_close(class_loss(logits, targets, matches), (w * ce).sum() / w.sum())
