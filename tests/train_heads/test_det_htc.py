"""Cascade Mask R-CNN and HTC as mmdetection runs them: the order of a stage's steps, ground truth dropped before
refinement, HTC's mask information flow, its semantic branch; HTC trained from a store (overfit, resume, stuff maps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dethelpers import CANVAS, LEVELS, SIZES, build_detection_store, detector, features, targets
from safetensors.torch import load_file

from fcache.common.errors import InputError
from fcache.train_heads import TrainConfig, run_train, run_train_heads
from fcache.train_heads.analysis.cka import tapped
from fcache.train_heads.detection.cascade import Samples
from fcache.train_heads.detection.htc import FusedSemanticHead, HTCMaskHead
from fcache.train_heads.detection.task import parse_detection_head

pytestmark = pytest.mark.usefixtures("one_thread")


def record_steps(model):
    """Wrap the steps of every stage so that one training forward records ``(stage, step)`` in call order."""
    calls = []
    heads = model.roi_heads

    def wrap(fn, k, step):
        def inner(*args, **kwargs):
            stage = args[0] if step in ("box_loss", "refine", "mask_loss") else k
            calls.append((stage, step))
            return fn(*args, **kwargs)

        return inner

    for k, stage in enumerate(heads.stages):
        stage.assign_targets_to_proposals = wrap(stage.assign_targets_to_proposals, k, "assign")
        stage.subsample = wrap(stage.subsample, k, "sample")
    for step in ("box_loss", "refine", "mask_loss"):
        setattr(heads, f"_{step}", wrap(getattr(heads, f"_{step}"), None, step))
    return calls


CASCADE_ORDER = ["assign", "sample", "box_loss", "mask_loss", "refine"]  # mmdetection's CascadeRoIHead.loss
HTC_ORDER = ["assign", "sample", "box_loss", "refine", "assign", "sample", "mask_loss"]  # interleaved


@pytest.mark.parametrize(("roi", "order"), [("cascade", CASCADE_ORDER), ("htc", HTC_ORDER)])
def test_the_steps_of_each_stage_come_in_mmdetections_order(roi, order):
    model = detector("fpn", LEVELS[2:], roi).train()
    calls = record_steps(model)
    model(features(LEVELS[2:]), SIZES, CANVAS, targets())
    want = [(k, step) for k in range(3) for step in order]
    if roi == "cascade":
        want.remove((2, "refine"))  # the last stage refines nothing
    assert calls == want


def test_ground_truth_added_to_the_proposals_is_dropped_before_refinement():
    model = detector("fpn", LEVELS[2:], "cascade").train()
    heads = model.roi_heads
    proposals = [torch.tensor([[12.0, 14.0, 58.0, 66.0], [0.0, 0.0, 30.0, 30.0]]), torch.tensor([[5.0, 5.0, 40.0, 40.0]])]
    t = targets()
    samples: Samples = heads._sample(0, proposals, t)
    assert [len(b) for b in samples.boxes] == [4, 1]  # every candidate is sampled: 2 proposals + 2 ground-truth boxes, 1 proposal
    gt_rows = samples.boxes[0][samples.is_gt[0]]
    assert torch.equal(gt_rows, t[0]["boxes"]) and not samples.is_gt[1].any()
    assert (samples.labels[0][samples.is_gt[0]] > 0).all()  # a ground-truth box is a positive of its own class
    deltas = torch.zeros(5, 4 * 3)  # no regression: refined boxes are the sampled ones
    refined = heads._refine(0, deltas, samples, SIZES)
    assert [len(r) for r in refined] == [2, 1]
    assert torch.allclose(refined[0], samples.boxes[0][~samples.is_gt[0]])


def test_mask_information_flow_feeds_each_head_the_previous_heads_features():
    model = detector("fpn", LEVELS[2:], "htc")
    mask_heads = [s.mask_head for s in model.roi_heads.stages]
    assert all(isinstance(h, HTCMaskHead) for h in mask_heads)
    assert mask_heads[0].conv_res is None and all(h.conv_res is not None for h in mask_heads[1:])
    calls = []  # (head, the tensor it received as previous, its output)
    for k, head in enumerate(mask_heads):
        head.register_forward_hook(lambda _m, args, out, k=k: calls.append((k, args[1] if len(args) > 1 else None, out)))

    def chains():
        """Split the calls into runs that start at head 0; check each head got the output of the one before."""
        runs = []
        for k, previous, out in calls:
            if k == 0:
                assert previous is None
                runs.append([out])
            else:
                assert previous is runs[-1][-1], f"head {k} did not get head {k - 1}'s features"
                runs[-1].append(out)
        return [len(r) for r in runs]

    model.train()
    model(features(LEVELS[2:]), SIZES, CANVAS, targets())
    assert chains() == [1, 2, 3]  # stage k's mask loss runs heads 0..k on its own RoIs
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(features(LEVELS[2:]), SIZES, CANVAS)
    assert chains() == [3]  # inference: one chain over the final boxes


def test_semantic_head_fuses_at_stride_8_when_there_is_one():
    with_p3 = FusedSemanticHead(detector("fpn", LEVELS, "standard").neck.out_levels, 32, 5)
    assert with_p3.stride == 8 and len(with_p3.lateral_convs) == 5
    without = FusedSemanticHead(detector("fpn", LEVELS[2:], "standard").neck.out_levels, 32, 5)
    assert without.stride == 16  # p4, p5 and the extra level: the finest
    feats = {lv.name: torch.randn(2, 32, lv.size(CANVAS), lv.size(CANVAS)) for lv in detector("fpn", LEVELS, "standard").neck.out_levels}
    logits, embedding = with_p3(feats)
    assert logits.shape == (2, 5, 16, 16) and embedding.shape == (2, 32, 16, 16) and (embedding >= 0).all()
    labels = torch.full((2, CANVAS, CANVAS), 255, dtype=torch.uint8)
    assert with_p3.loss(logits, labels) == 0  # nothing labelled: no loss, no NaN
    labels[:, :8] = 1
    assert with_p3.loss(logits, labels) > 0


def test_fcache_cka_taps_the_htc_stages_like_the_cascades():
    model = detector("fpn", LEVELS[2:], "htc,semantic=1").eval()
    with tapped(model) as taps, torch.no_grad():
        model(features(LEVELS[2:]), SIZES, CANVAS)
        group = taps().groups["cascade"]
    assert list(group) == [f"s{s} {k}" for s in (1, 2, 3) for k in ("RoI", "fc6", "fc7")]
    assert len({v.shape[0] for v in group.values()}) == 1  # the same RoIs in every stage


def test_head_keys_are_checked():
    with pytest.raises(InputError, match="roi=htc"):
        parse_detection_head("fpn:semantic=1")
    with pytest.raises(InputError, match="roi=cascade or roi=htc"):
        parse_detection_head("fpn:score=probs")
    assert parse_detection_head("bifpn:roi=htc,semantic=1")["semantic"] is True


# -- training from a store ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stuff_store(tmp_path_factory):
    """The detection store of the other tests with COCO-stuff style maps."""
    return build_detection_store(tmp_path_factory.mktemp("stuff") / "stuff.zarr", stuff=True)


def _config(store, out, **kw):
    base = dict(
        store=str(store), out=str(out), head="fpn:roi=htc,channels=32,rois=16,rpn_batch=16", iters=6, batch_size=2, lr=1e-3, warmup=2
    )
    return TrainConfig(**{**base, "num_workers": 0, "device": "cpu", "log_every": 1, "checkpoint_every": 100, **kw})


@pytest.mark.slow
def test_htc_overfits_the_training_images(det_store, tmp_path):
    cfg = _config(det_store, tmp_path / "run", head="fpn:roi=htc,channels=32,rois=32,rpn_batch=32", iters=100, warmup=10,
                  log_every=10, val_store=str(det_store))  # fmt: skip
    summary = run_train(cfg, progress=False)
    assert summary["eval"]["box/AP50"] >= 0.9 and summary["eval"]["mask/AP50"] >= 0.9, summary["eval"]


def test_htc_resume_continues_bit_exactly(stuff_store, tmp_path):
    head = "bifpn:layers=1,roi=htc,semantic=1,channels=32,rois=16,rpn_batch=16"
    run_train(_config(stuff_store, tmp_path / "straight", head=head), progress=False)
    run_train(_config(stuff_store, tmp_path / "split", head=head, stop_at=3), progress=False)
    second = run_train(_config(stuff_store, tmp_path / "split", head=head, resume=True), progress=False)
    assert (second["iters"]["start"], second["iters"]["stop"]) == (3, 6)
    straight, split = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "split"))
    assert straight.keys() == split.keys() and any("semantic_head" in k for k in straight)
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_the_semantic_branch_learns_the_stuff_maps(stuff_store, det_store, tmp_path):
    head = "fpn:roi=htc,semantic=1,channels=32,rois=16,rpn_batch=16"
    cfg = _config(stuff_store, tmp_path / "run", head=head, iters=12, lr=3e-3, val_store=str(det_store))
    summary = run_train(cfg, progress=False)
    assert set(summary["eval"]) >= {"box/AP", "mask/AP"}  # evaluated on a store without stuff maps: none are needed
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    semantic = [r["loss_semantic"] for r in log if "loss_semantic" in r]
    # weighted, 183 classes at first, averaged over every pixel (mmdetection's): ignored ones count with 0
    shares = _labelled_shares(stuff_store, stride=8)
    assert len(semantic) == 12 and min(shares) * 0.9 <= semantic[0] / (0.2 * math.log(183)) <= max(shares) * 1.1, (semantic[0], shares)
    assert sum(semantic[-3:]) / 3 < 0.9 * semantic[0], semantic


def _labelled_shares(path, stride: int) -> list[float]:
    """Per sample: the share of labelled pixels in its stuff map on the canvas, at the semantic logits' resolution."""
    import torch.nn.functional as F

    from fcache import store as fstore
    from fcache.spec import Targets
    from fcache.train_heads.segmentation.targets import view_labels

    s = fstore.open(path)
    out = []
    for i in s.ok_indices:
        g = s.geometry(int(i))
        canvas = torch.from_numpy(view_labels(np.asarray(s.target(Targets.STUFF, int(i))), g))[None, None].float()
        small = F.interpolate(canvas, size=(round(g.canvas) // stride,) * 2, mode="nearest")
        out.append(float((small != Targets.IGNORE).float().mean()))
    return out


def test_semantic_needs_a_store_with_stuff_maps(det_store, tmp_path):
    with pytest.raises(InputError, match="--stuff-root"):
        run_train(_config(det_store, tmp_path / "run", head="fpn:roi=htc,semantic=1"), progress=False)
    assert not (tmp_path / "run").exists()


def test_heads_reading_other_targets_are_not_trained_in_one_pass(stuff_store, tmp_path):
    heads = ["fpn:roi=htc,semantic=1,channels=32", "fpn:roi=htc,channels=32"]
    with pytest.raises(InputError, match="read the same targets"):
        run_train_heads([_config(stuff_store, tmp_path / "runs", head=h) for h in heads], progress=False)
    assert not (tmp_path / "runs").exists()
