"""Video heads (paper Table 4): output shapes, exact parameter counts, time-order sensitivity, head specs, Table 13 defaults."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from fcache.spec import LevelSpec
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.tasks import task_defaults
from fcache.train_heads.video import GlobalHead, TemporalHead, VideoLinear, VideoTask, parse_video_head

B, T, C, H, W, K = 2, 4, 8, 2, 2, 3


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def block(d: int) -> int:
    """One pre-norm block of width d, counted by hand: 2 LayerNorms, qkv and output projections, MLP d -> 4d -> d."""
    norms = 2 * (2 * d)
    attention = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    return norms + attention + mlp


def test_block_count_by_hand():
    assert block(8) == 16 + 216 + 72 + 16 + 288 + 264 == 872


def test_output_shapes_and_parameter_counts():
    x = torch.randn(B, T, C, H, W)
    linear = VideoLinear(C, K)
    temporal = TemporalHead(C, K, frames=T, blocks=1, dim=C, heads=1)
    wide = TemporalHead(C, K, frames=T, blocks=2, dim=16, heads=2)
    joint = GlobalHead(C, K, frames=T, grid=(H, W), blocks=1, dim=C, heads=1)
    for model in (linear, temporal, wide, joint):
        assert model(x).shape == (B, K)
    assert params(linear) == C * K + K == 27
    # no projection (dim == C); temporal embedding T x C; one block; final LayerNorm; classifier
    assert params(temporal) == T * C + 872 + 2 * C + (C * K + K) == 947
    # projection C -> 16; temporal embedding T x 16; two blocks of width 16; LayerNorm; classifier
    assert params(wide) == (C * 16 + 16) + T * 16 + 2 * block(16) + 2 * 16 + (16 * K + K) == 6851
    # the temporal head plus a spatial embedding (H x W) x C
    assert params(joint) == 947 + H * W * C == 979


def test_temporal_attends_per_location_global_over_all_tokens():
    x = torch.randn(B, T, C, H, W)
    assert TemporalHead(C, K, frames=T, blocks=1, dim=16, heads=2).tokens(x).shape == (B * H * W, T, 16)
    assert GlobalHead(C, K, frames=T, grid=(H, W), blocks=1, dim=16, heads=2).tokens(x).shape == (B, T * H * W, 16)


def test_only_the_block_heads_see_time_order():
    torch.manual_seed(0)
    x = torch.randn(B, T, C, H, W)
    reversed_x = x.flip(1)
    linear = VideoLinear(C, K).eval()
    torch.testing.assert_close(linear(x), linear(reversed_x))
    for head in (TemporalHead(C, K, frames=T, blocks=1, dim=C, heads=1), GlobalHead(C, K, frames=T, grid=(H, W), blocks=1, dim=C, heads=1)):
        head.eval()
        assert not torch.allclose(head(x), head(reversed_x), atol=1e-6)


def test_stochastic_depth_rises_linearly_over_the_blocks():
    head = TemporalHead(C, K, frames=T, blocks=4, dim=C, heads=1, drop_path=0.3)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in head.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert not isinstance(TemporalHead(C, K, frames=T, blocks=1, dim=C, heads=1).blocks[0].drop_path1, DropPath)  # one block: 0


def test_spec_defaults_and_canonical_form():
    spec = parse_video_head("temporal")
    assert str(spec) == "temporal:blocks=4,dim=0,drop_path=0.2,dropout=0.5,heads=0,level=p5"
    assert parse_video_head(str(spec)) == spec
    assert str(parse_video_head("linear:level=p4")) == "linear:dropout=0.5,level=p4"
    assert parse_video_head("global:drop_path=0.1,blocks=2")["drop_path"] == 0.1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("temporal:dropout=1.5", "dropout=1.5 must be in [0, 1)"),
        ("global:drop_path=lots", "drop_path='lots' is not a number"),
        ("temporal:blocks=0", "blocks=0 must be at least 1"),
        ("linear:blocks=2", "unknown key 'blocks' (known: dropout, level)"),
        ("temporal:level=p7", "level='p7' is not one of p2, p3, p4, p5, p6"),
        ("slowfast", "unknown head 'slowfast' for video; choose one of: global, linear, temporal"),
    ],
)
def test_spec_errors_name_the_fix(text, message):
    with pytest.raises(ValueError) as e:
        parse_video_head(text)
    assert message in str(e.value)


def test_widths_default_to_the_channels_capped_at_1024():
    task = VideoTask(parse_video_head("global"), ("a", "b"), frames=16, grid=(7, 7))
    assert task.widths(768) == (768, 24) and task.widths(1024) == (1024, 32) and task.widths(4096) == (1024, 32)
    assert task.widths(8) == (8, 1)
    odd = VideoTask(parse_video_head("temporal:dim=24,heads=5"), ("a", "b"), frames=4, grid=(2, 2))
    with pytest.raises(ValueError, match="dim=24 must be even and a multiple of heads=5"):
        odd.build((LevelSpec("p5", 8, 32),))


def test_table_13_defaults_and_warmup_in_epochs():
    video = task_defaults("video", "temporal:blocks=4")
    assert video == {"batch_size": 64, "lr": 3e-4, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 2.5}
    cfg = with_defaults(TrainConfig(store="s", out="o", head="linear", iters=100, task="video"))  # Python gets the task's defaults too
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.warmup_epochs) == (64, 3e-4, 0.05, "cosine", 2.5)
    assert cfg.resolved(train_samples=240).warmup == 10  # ceil(2.5 * 240 / 64)
    assert with_defaults(TrainConfig(store="s", out="o", head="fpn", iters=1)).resolved(10).warmup == 500  # detection: iterations
    # a warm-up given in either unit replaces the task's default in both
    given = with_defaults(
        TrainConfig.from_flags(store="s", out="o", head="linear", iters=100, task="video", warmup=100, warmup_epochs=None)
    )
    assert given.warmup == 100 and given.warmup_epochs is None and given.resolved(240).warmup == 100
    video = with_defaults(TrainConfig(store="s", out="o", head="linear", iters=100, task="video", warmup_epochs=1.0))
    assert video.resolved(128).warmup == 2
    detection = with_defaults(TrainConfig(store="s", out="o", head="fpn", iters=100, warmup_epochs=1.0, batch_size=None))
    assert detection.warmup_epochs == 1.0 and detection.batch_size == 16 and detection.resolved(32).warmup == 2
    with pytest.raises(ValueError, match="not both"):
        TrainConfig.from_flags(store="s", out="o", head="linear", iters=100, task="video", warmup=100, warmup_epochs=1.0)
