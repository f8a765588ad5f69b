"""Necks built from LevelSpecs: output pyramid for 2, 3 and 4 stored levels, and what each family promises."""

from __future__ import annotations

import pytest
import torch
from dethelpers import LEVELS

from fcache.spec import LevelSpec
from fcache.train_heads.necks import FPN, NECKS, BiFPN, FPNRes
from fcache.train_heads.necks.bifpn import FastFusion, resample

SUBSETS = {
    "p2-p5": LEVELS,
    "p3-p5": LEVELS[1:],
    "p2+p4": (LEVELS[0], LEVELS[2]),  # a gap between stored levels
}
CANVAS = 96  # not a power of two: sizes are ceil(96 / stride) = 24, 12, 6, 3, then 2


def features(levels, batch=2):
    torch.manual_seed(0)
    return {lv.name: torch.randn(batch, lv.channels, lv.size(CANVAS), lv.size(CANVAS)) for lv in levels}


def params(name, **kw):
    return {**{k: p.default for k, p in NECKS[name].params.items()}, "channels": 32, **kw}


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("name", NECKS)
def test_output_pyramid(name, subset):
    levels = SUBSETS[subset]
    neck = NECKS[name].build(levels, params(name))
    out = neck(features(levels))
    top = max(lv.stride for lv in levels)
    want = [(lv.name, lv.stride) for lv in sorted(levels, key=lambda lv: lv.stride)] + [({32: "p6", 16: "p5"}[top], 2 * top)]
    assert [(lv.name, lv.stride) for lv in neck.out_levels] == want
    assert list(out) == [n for n, _ in want]
    for lv in neck.out_levels:
        assert out[lv.name].shape == (2, 32, -(-CANVAS // lv.stride), -(-CANVAS // lv.stride)), lv
        assert torch.isfinite(out[lv.name]).all()


@pytest.mark.parametrize("name", NECKS)
def test_needs_two_levels(name):
    with pytest.raises(ValueError, match="at least 2 feature levels"):
        NECKS[name].build(LEVELS[3:], params(name))


def test_channels_come_from_the_level_specs():
    wide = (LevelSpec("p4", 40, 16), LevelSpec("p5", 72, 32))
    fpn = FPN(wide, channels=32)
    assert [b[0].in_channels for b in fpn.fpn.inner_blocks] == [40, 72]
    bifpn = BiFPN(wide, channels=32)
    assert [bifpn.proj[n][0].in_channels for n in ("p4", "p5")] == [40, 72]


def test_fpn_res_starts_as_the_plain_fpn_and_adds_four_blocks_per_level():
    torch.manual_seed(0)
    plain = FPN(LEVELS, channels=32)
    torch.manual_seed(0)
    res = FPNRes(LEVELS, channels=32, blocks=4)  # the same FPN weights, then the blocks
    x = features(LEVELS)
    for a, b in zip(plain(x).values(), res(x).values(), strict=True):
        torch.testing.assert_close(a, b)  # zero-initialised residual branches
    per_block = sum(p.numel() for p in res.fpn.layer_blocks[0][1].parameters())
    extra = sum(p.numel() for p in res.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 4 * len(LEVELS) * per_block


def test_bifpn_layers_stack_and_fusion_is_normalised():
    one, three = BiFPN(LEVELS, channels=32, layers=1), BiFPN(LEVELS, channels=32, layers=3)
    assert len(three.layers) == 3
    n_out = len(one.out_levels)
    assert len(one.layers[0].top_down) == n_out - 1 and len(one.layers[0].bottom_up) == n_out - 1
    fusion = FastFusion(3, 32, "gn")
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([2.0, -1.0, 0.0]))  # ReLU drops negatives
        fusion.conv = torch.nn.Identity()
    xs = [torch.full((1, 32, 2, 2), v) for v in (1.0, 5.0, 7.0)]
    torch.testing.assert_close(fusion(xs), torch.nn.functional.silu(torch.full((1, 32, 2, 2), 2.0 / (2 + 1e-4))))


def test_resample_between_levels():
    x = torch.randn(1, 4, 12, 12)
    assert resample(x, (24, 24)).shape[-2:] == (24, 24)
    assert resample(x, (6, 6)).shape[-2:] == (6, 6)
    assert resample(x, (3, 3)).shape[-2:] == (3, 3)  # two octaves down (a gap between stored levels)
    assert resample(torch.randn(1, 4, 3, 3), (2, 2)).shape[-2:] == (2, 2)  # ceil(3 / 2)


def test_batchnorm_variant_builds_and_gn_needs_divisible_channels():
    assert isinstance(BiFPN(LEVELS, channels=32, norm="bn").layers[0].top_down[0].conv[2], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="divisible by 32"):
        BiFPN(LEVELS, channels=48, norm="gn")


def test_bifpn_checkpointing_changes_memory_not_math():
    """checkpoint=1 recomputes each layer in the backward pass: same outputs, same gradients."""
    levels = (LevelSpec("p3", 16, 8), LevelSpec("p4", 24, 16), LevelSpec("p5", 32, 32))
    feats = {
        lv.name: torch.randn(2, lv.channels, 64 // lv.stride, 64 // lv.stride, generator=torch.Generator().manual_seed(1)) for lv in levels
    }
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        neck = NECKS["bifpn"].build(levels, {"channels": 32, "layers": 3, "norm": "gn", "checkpoint": flag}).train()
        out = neck(feats)
        sum(o.square().mean() for o in out.values()).backward()
        grads.append([p.grad.clone() for p in neck.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
