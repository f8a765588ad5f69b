"""Top-k scoring over views (hand-made cases) and the linear probe's pooling over image content only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcache.train_heads.classification import LinearProbe, score_views, topk_hits
from fcache.train_heads.classification.scoring import prediction_records

VIEWS = ("clip0-crop0", "clip1-crop0")
# (N=4, V=2, K=6) softmax scores; labels 0, 1, 2 and one unlabelled sample (-1)
PROBS = np.array(
    [
        [[0.40, 0.45, 0.05, 0.05, 0.05, 0.00], [0.70, 0.10, 0.05, 0.05, 0.05, 0.05]],  # view 0 wrong (1), view 1 right
        [[0.10, 0.60, 0.10, 0.10, 0.05, 0.05], [0.50, 0.20, 0.10, 0.10, 0.05, 0.05]],  # view 0 right, view 1 wrong (0)
        [[0.30, 0.30, 0.00, 0.20, 0.10, 0.10], [0.05, 0.05, 0.45, 0.35, 0.05, 0.05]],  # view 0: label last of 6
        [[1.00, 0.00, 0.00, 0.00, 0.00, 0.00], [1.00, 0.00, 0.00, 0.00, 0.00, 0.00]],  # unlabelled: not scored
    ]
)
LABELS = np.array([0, 1, 2, -1])


def test_views_are_scored_alone_and_averaged():
    m = score_views(PROBS, LABELS, VIEWS)
    # means over the views: [.55 .275 .05 .05 .05 .025] -> 0 (right), [.3 .4 .1 .1 .05 .05] -> 1 (right),
    # [.175 .175 .225 .275 .075 .075] -> 3 (wrong, but 2 is in the top 5)
    assert m["avg/top1"] == pytest.approx(2 / 3) and m["avg/top5"] == 1.0
    assert m["clip0-crop0/top1"] == pytest.approx(1 / 3) and m["clip0-crop0/top5"] == pytest.approx(2 / 3)
    assert m["clip1-crop0/top1"] == pytest.approx(2 / 3) and m["clip1-crop0/top5"] == 1.0
    assert list(m) == [f"{f}/top{k}" for f in ("avg", *VIEWS) for k in (1, 5)]


def test_prediction_records_rank_the_mean_scores():
    names = tuple("abcdef")
    records = prediction_records(["k0", "k1", "k2", "k3"], LABELS, PROBS, VIEWS, names)
    assert [r["pred"] for r in records] == [0, 1, 3, 0]  # the averaged predictions differ from both views' [1 1 0 0], [0 0 2 0]
    assert [r["views"] for r in records][:3] == [{VIEWS[0]: 1, VIEWS[1]: 0}, {VIEWS[0]: 1, VIEWS[1]: 0}, {VIEWS[0]: 0, VIEWS[1]: 2}]
    r = records[2]
    assert (r["key"], r["label"], r["label_name"], r["pred_name"]) == ("k2", 2, "c", "d")
    assert r["top5"] == [3, 2, 0, 1, 4] and r["top5_scores"] == pytest.approx([0.275, 0.225, 0.175, 0.175, 0.075])
    assert records[3]["label"] == -1 and records[3]["label_name"] is None


def test_topk_is_capped_at_the_classes_and_breaks_ties_by_index():
    scores = np.array([[0.5, 0.5], [0.2, 0.8]])
    assert topk_hits(scores, np.array([1, 0]), 1).tolist() == [False, False]  # a tie goes to the lower index
    assert topk_hits(scores, np.array([1, 0]), 5).tolist() == [True, True]


def test_scoring_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="no evaluated sample has a label"):
        score_views(PROBS[3:], LABELS[3:], VIEWS)
    with pytest.raises(ValueError, match="do not match"):
        score_views(PROBS, LABELS, VIEWS[:1])


def test_probe_pools_the_content_cells_only():
    torch.manual_seed(0)
    probe = LinearProbe(channels=4, num_classes=3, stride=32).eval()
    x = torch.randn(2, 4, 4, 4)
    x[0, :, 2:] = 1e3  # padding below a 128 x 64 (w x h) content region: rows 2-3 of a 4 x 4 map at stride 32
    x[1, :, :, 3:] = -1e3  # padding right of 65 x 128 content: ceil(65 / 32) = 3 columns are content
    content = torch.tensor([[64.0, 128.0], [128.0, 65.0]])  # (valid_h, valid_w)
    expected = probe.classifier(torch.stack([x[0, :, :2].mean((1, 2)), x[1, :, :, :3].mean((1, 2))]))
    torch.testing.assert_close(probe(x, content), expected)
    torch.testing.assert_close(probe(x), probe.classifier(x.mean((2, 3))))
