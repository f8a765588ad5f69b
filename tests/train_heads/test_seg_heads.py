"""Segmentation heads built from LevelSpecs: output shapes for 2, 3 and 4 stored levels, losses, inference, head specs."""

from __future__ import annotations

import pytest
import torch

from fcache.spec import Geometry, LevelSpec
from fcache.train_heads.necks import UPerFPN
from fcache.train_heads.segmentation import Mask2Former, SegmentationTask, UPerNet, parse_segmentation_head
from fcache.train_heads.tasks import TASKS, task_defaults

pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = (LevelSpec("p2", 8, 4), LevelSpec("p3", 16, 8), LevelSpec("p4", 24, 16), LevelSpec("p5", 40, 32))
SUBSETS = {
    "p2-p5": LEVELS,
    "p3-p5": LEVELS[1:],
    "p4+p5": LEVELS[2:],
    "p2+p4": (LEVELS[0], LEVELS[2]),  # a gap between stored levels
}
SPECS = [
    "upernet:channels=64,aux=1",
    "upernet:neck=bifpn,layers=2,channels=64",
    "mask2former:channels=32,queries=10,pixel_blocks=2,decoder_blocks=2",
]
CANVAS, K = 64, 5
# a 60 x 40 image fitted into the canvas, mirrored: content 64 x 43 (rows 43..63 are padding)
VIEW = Geometry(orig_h=40, orig_w=60, scale=CANVAS / 60, valid_w=CANVAS, valid_h=round(40 * CANVAS / 60), flip=1.0, canvas=CANVAS)


def build(spec: str, levels):
    head = parse_segmentation_head(spec)
    torch.manual_seed(0)
    return head, SegmentationTask(head, [f"c{k}" for k in range(K)]).build(tuple(levels))


def batch(levels):
    torch.manual_seed(1)
    feats = {lv.name: torch.randn(2, lv.channels, lv.size(CANVAS), lv.size(CANVAS)) for lv in levels}
    labels = torch.randint(0, K, (2, CANVAS, CANVAS))
    labels[:, int(VIEW.valid_h) :] = 255  # padding below the content
    return feats, labels


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("spec", SPECS)
def test_shapes_losses_and_inference(spec, subset):
    levels = SUBSETS[subset]
    head, model = build(spec, levels)
    feats, labels = batch(levels)
    finest = min(lv.stride for lv in levels)
    out = model(feats)
    if isinstance(model, UPerNet):
        assert out["logits"].shape == (2, K, CANVAS // finest, CANVAS // finest)
        second = sorted(levels, key=lambda lv: lv.stride)[-2]
        assert ("aux" in out) == bool(head["aux"])
        if head["aux"]:
            assert out["aux"].shape == (2, K, CANVAS // second.stride, CANVAS // second.stride)
    else:
        assert isinstance(model, Mask2Former)
        assert len(out["logits"]) == len(out["masks"]) == head["decoder_blocks"] + 1  # the "(m+1)" predictions
        assert all(x.shape == (2, 10, K + 1) for x in out["logits"])
        assert all(x.shape == (2, 10, CANVAS // finest, CANVAS // finest) for x in out["masks"])
    losses = model.losses(out, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not unused, unused
    model.eval()
    with torch.no_grad():
        probs = model.probabilities(model(feats), 1, VIEW)
    assert probs.shape == (K, 40, 60) and (probs >= 0).all()
    if isinstance(model, UPerNet):
        torch.testing.assert_close(probs.sum(0), torch.ones(40, 60))


def test_mask2former_splits_levels_as_the_reference():
    """p3..p5 go through the deformable encoder (coarse first), p2 joins by the FPN path and carries the mask features."""
    cases = {
        "p2-p5": (["p5", "p4", "p3"], ["p2"]),
        "p3-p5": (["p5", "p4"], ["p3"]),
        "p4+p5": (["p5"], ["p4"]),
        "p2+p4": (["p4"], ["p2"]),
    }
    for subset, (deform, fpn) in cases.items():
        _, model = build(SPECS[2], SUBSETS[subset])
        assert [lv.name for lv in model.pixel_decoder.deform_levels] == deform
        assert [lv.name for lv in model.pixel_decoder.fpn_levels] == fpn
        assert model.stride == SUBSETS[subset][0].stride
    _, model = build("mask2former:pixel_blocks=6,decoder_blocks=9", LEVELS)
    assert len(model.pixel_decoder.encoder) == 6 and len(model.decoder.blocks) == 9
    assert model.decoder.query_feat.weight.shape == (100, 256)  # the paper's 100 queries, reference width


def test_upernet_takes_the_neck_from_its_table():
    _, fpn = build("upernet:channels=64", LEVELS)
    _, bifpn = build("upernet:neck=bifpn,layers=3,channels=64", LEVELS)
    _, res = build("upernet:neck=fpn-res,channels=64", LEVELS)
    assert isinstance(fpn.neck, UPerFPN) and type(bifpn.neck).__name__ == "BiFPN" and len(bifpn.neck.layers) == 3
    assert type(res.neck).__name__ == "FPNRes" and len(res.neck.fpn.layer_blocks[0]) == 5  # its table default: 4 blocks
    # the PPM output (channels wide) replaces the deepest level as the neck's input
    assert [lv.channels for lv in fpn.neck.in_levels] == [8, 16, 24, 64]
    assert fpn.ppm.branches[0][1][0].in_channels == 40


def test_upernet_passes_its_necks_own_parameters_typed():
    """neck=X brings X's own keys (bifpn: checkpoint, fpn-res: blocks), parsed by X's table; at their defaults they are
    left out of the spec, so specs written before still name the same RUN folders."""
    head, bifpn = build("upernet:neck=bifpn,checkpoint=1,channels=64", LEVELS)
    assert head["checkpoint"] is True and bifpn.neck.checkpoint is True
    assert str(head) == "upernet:aux=0,channels=64,checkpoint=1,layers=1,levels=all,neck=bifpn,norm=gn"
    assert parse_segmentation_head(str(head)) == head
    assert parse_segmentation_head("upernet:neck=bifpn,checkpoint=0") == parse_segmentation_head("upernet:neck=bifpn")
    head, res = build("upernet:neck=fpn-res,blocks=2,channels=64", LEVELS)
    assert head["blocks"] == 2 and len(res.neck.fpn.layer_blocks[0]) == 3  # the output conv + 2 blocks
    assert parse_segmentation_head("upernet:aux=1")["aux"] is True
    for text, message in [
        ("upernet:checkpoint=1", "unknown key 'checkpoint' (known: aux, channels, layers, levels, neck, norm)"),
        ("upernet:neck=bifpn,checkpoint=yes", "head upernet: checkpoint=yes must be 0 or 1"),
        ("upernet:blocks=0,neck=fpn-res", "head upernet: blocks=0 must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_segmentation_head(text)


SWINV2_B = tuple(LevelSpec(f"p{k + 2}", 128 * 2**k, 4 * 2**k) for k in range(4))  # 128, 256, 512, 1024 at strides 4..32


@pytest.mark.parametrize(
    ("spec", "params"),
    [("upernet", 33_315_990), ("upernet:norm=bn", 33_315_990), ("upernet:aux=1", 34_534_700), ("upernet:aux=1,norm=bn", 34_534_700)],
)
def test_upernet_is_mmsegs_uperhead(spec, params):
    """mmseg's UPerHead (channels 512, 150 classes) on SwinV2-B's levels: 33,315,990 parameters, the FCN aux head 1,218,710."""
    model = SegmentationTask(parse_segmentation_head(spec), [f"c{k}" for k in range(150)]).build(SWINV2_B)
    assert sum(p.numel() for p in model.parameters()) == params
    lateral = model.neck.lateral["p2"]  # a ConvModule: conv without bias, norm, ReLU
    assert lateral[0].kernel_size == (1, 1) and lateral[0].bias is None and isinstance(lateral[2], torch.nn.ReLU)
    assert isinstance(lateral[1], torch.nn.BatchNorm2d if "bn" in spec else torch.nn.GroupNorm)
    assert set(model.neck.lateral) == set(model.neck.output) == {"p2", "p3", "p4"}  # the pooling output is the top lateral
    assert model.neck.output["p2"][0].kernel_size == (3, 3) and model.fuse[0].in_channels == 4 * 512


def test_uper_fpn_top_down_is_bilinear_and_the_top_passes_through():
    levels = (LevelSpec("p3", 16, 8), LevelSpec("p4", 32, 16))
    neck = UPerFPN(levels, channels=32, norm="gn").eval()
    feats = {"p3": torch.randn(1, 16, 8, 8), "p4": torch.randn(1, 32, 4, 4)}
    with torch.no_grad():
        out = neck(feats)
        up = torch.nn.functional.interpolate(feats["p4"], size=(8, 8), mode="bilinear", align_corners=False)
        want = neck.output["p3"](neck.lateral["p3"](feats["p3"]) + up)
    assert list(out) == ["p3", "p4", "p5"] and torch.equal(out["p4"], feats["p4"])
    torch.testing.assert_close(out["p3"], want)
    assert out["p5"].shape == (1, 32, 2, 2)
    with pytest.raises(ValueError, match="deepest level .p4. 64 wide"):
        UPerFPN(levels, channels=64)


def test_head_specs_print_canonically():
    assert str(parse_segmentation_head("upernet")) == "upernet:aux=0,channels=512,layers=1,levels=all,neck=fpn,norm=gn"
    assert (
        str(parse_segmentation_head("upernet:neck=bifpn,layers=5")) == "upernet:aux=0,channels=512,layers=5,levels=all,neck=bifpn,norm=gn"
    )
    m2f = parse_segmentation_head("mask2former:pixel_blocks=6,decoder_blocks=9")
    assert str(m2f) == "mask2former:channels=256,decoder_blocks=9,levels=all,pixel_blocks=6,queries=100"
    assert parse_segmentation_head(str(m2f)) == m2f


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upernet:layers=5", "layers=5 applies to neck=bifpn only"),
        ("upernet:aux=2", "aux=2 must be 0 or 1"),
        ("upernet:neck=fancy", "neck='fancy' is not one of fpn, fpn-res, bifpn"),
        ("upernet:neck=fpn-res,layers=2", "layers=2 applies to neck=bifpn only"),
        ("mask2former:blocks=3", "unknown key 'blocks'"),
        ("mask2former:decoder_blocks=0", "decoder_blocks=0 must be at least 1"),
        ("fpn", "unknown head 'fpn' for segmentation; choose one of: mask2former, upernet"),
    ],
)
def test_bad_head_specs(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_segmentation_head(text)


@pytest.mark.parametrize(
    ("spec", "levels", "message"),
    [
        ("upernet:channels=96,aux=1", LEVELS, "needs channels divisible by 64"),
        ("mask2former:channels=48", LEVELS, "channels=48 must be divisible by 32"),
        ("upernet", LEVELS[3:], "upernet needs at least 2 feature levels"),
        ("mask2former", LEVELS[3:], "mask2former needs at least 2 feature levels"),
    ],
)
def test_heads_that_cannot_work_are_refused(spec, levels, message):
    with pytest.raises(ValueError, match=message):
        build(spec, levels)


def test_training_defaults_follow_table_12_per_head():
    train_defaults = TASKS["segmentation"].train_defaults
    assert train_defaults("mask2former:pixel_blocks=6") == {"lr": 3e-4, "weight_decay": 0.02, "warmup": 0, "schedule": "linear"}
    assert train_defaults("upernet:neck=bifpn,layers=5") == {
        "lr": 2e-3,
        "weight_decay": 0.05,
        "warmup": 1500,
        "warmup_factor": 1e-6,
        "schedule": "linear",
    }
    assert task_defaults("segmentation", "upernet") == train_defaults("upernet")
    assert task_defaults("detection", "bifpn:layers=5") == {}  # detection keeps TrainConfig's Table 11 defaults
    with pytest.raises(ValueError, match="unknown task 'pose'"):
        task_defaults("pose", "upernet")


def test_upernet_norms_its_pooled_branch_or_says_why_not():
    """The 1x1 pyramid-pooling branch holds one value per channel and sample: GN needs 2 channels per group, BN a batch of 2."""
    with pytest.raises(ValueError, match="norm=gn needs channels of at least 64 \\(got 32\\); or use norm=bn"):
        build("upernet:channels=32", LEVELS)
    _, model = build("upernet:channels=32,norm=bn", LEVELS)
    model.train()
    one = {lv.name: torch.randn(1, lv.channels, 4, 4) for lv in LEVELS}
    with pytest.raises(ValueError, match="norm=bn trains on batches of at least 2"):
        model(one)
    two = {k: torch.cat([v, v + 1]) for k, v in one.items()}
    assert model(two)["logits"].shape[0] == 2
    model.eval()
    assert torch.isfinite(model(one)["logits"]).all()  # evaluation takes a batch of 1 (running statistics)
    _, gn = build("upernet:channels=64", LEVELS)
    assert torch.isfinite(gn(one)["logits"]).all() and torch.isfinite(gn.eval()(one)["logits"]).all()
