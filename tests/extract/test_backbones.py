"""Backbones: aliases, NCHW features equal to timm's own forward, strict weights loading in timm's and the official
Swin layout, windows, the paper's SwinV2-G on the meta device."""

from __future__ import annotations

import hashlib
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from fcache.extract import swinv2_giant
from fcache.extract.backbones import build_backbone, default_window, parameter_count, resolve


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def test_features_equal_direct_timm_forward(images, tiny_backbone):
    bb = tiny_backbone  # swinv2-t at 128, random-init with seed 3
    torch.manual_seed(3)
    ref = timm.create_model("swinv2_tiny_window16_256", pretrained=False, features_only=True, img_size=128).eval()
    feats = bb.forward(images)
    with torch.inference_mode():
        want = [f.permute(0, 3, 1, 2) for f in ref(images)]  # timm SwinV2 gives NHWC
    assert list(feats) == ["p2", "p3", "p4", "p5"]
    for (name, got), w in zip(feats.items(), want, strict=True):
        assert got.shape == w.shape, name
        torch.testing.assert_close(got, w, rtol=0, atol=1e-5)
    assert [(lv.channels, lv.stride) for lv in bb.info.levels] == [(96, 4), (192, 8), (384, 16), (768, 32)]
    assert bb.info.window == 16 and bb.info.weights == "random-init"


def test_level_subset_comes_from_feature_info(images):
    bb = build_backbone("swinv2-t", input_size=128, random_init=True, levels=["p5", "p3"])
    feats = bb.forward(images[:1])
    assert list(feats) == ["p3", "p5"] and feats["p5"].shape == (1, 768, 4, 4)
    with pytest.raises(ValueError, match="no level p6"):
        build_backbone("swinv2-t", input_size=128, random_init=True, levels=["p6"])


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_weights_file_loads_strictly(tmp_path, images, fmt):
    torch.manual_seed(11)
    src = timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=128)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = build_backbone("swinv2-t", input_size=128, weights=str(path))
    assert len(bb.info.weights) == 64  # the file's sha256
    feats = bb.forward(images)
    with torch.inference_mode():
        want = src.eval().forward_intermediates(images, intermediates_only=True)
    torch.testing.assert_close(feats["p4"], want[2], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_wrong_weights_fail_with_key_diff(tmp_path):
    state = timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=128).state_dict()
    state.pop("norm.weight")
    state["extra.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\(timm layout\): missing \(1\): norm\.weight; unexpected \(1\): extra\.bias"):
        build_backbone("swinv2-t", input_size=128, weights=str(tmp_path / "bad.pt"))
    small = timm.create_model("swinv2_small_window16_256", pretrained=False, img_size=128)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"unexpected \(204\): layers\.2\.blocks\.10"):  # SwinV2-S has 12 more blocks
        build_backbone("swinv2-t", input_size=128, weights=str(tmp_path / "small.pt"))
    torch.save({"model": to_official_layout(small)}, tmp_path / "small_official.pth")
    with pytest.raises(ValueError, match=r"\(converted by timm's checkpoint_filter_fn\): unexpected \(204\): layers\.2\.blocks\.10"):
        build_backbone("swinv2-t", input_size=128, weights=str(tmp_path / "small_official.pth"))


def to_official_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm SwinV2's state dict as microsoft/Swin-Transformer saves it: each stage's downsample at its end, the
    classifier ``head``, and the buffers the official code keeps (coords table and index in every block, the
    shifted-window mask where a block shifts)."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v.clone()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            out[prefix + "attn.relative_coords_table"] = block.attn.relative_coords_table.clone()  # (1, 2W-1, 2W-1, 2)
            out[prefix + "attn.relative_position_index"] = block.attn.relative_position_index.clone()  # (W*W, W*W)
            if block.attn_mask is not None:
                out[prefix + "attn_mask"] = block.attn_mask.clone()  # (nW, W*W, W*W)
    return out


@pytest.mark.parametrize("release", ["official", "simmim"])
def test_official_swin_checkpoints_load(tmp_path, images, release):
    """A checkpoint in the official layout (and SimMIM's, under ``encoder.``) gives the seeded timm model's features."""
    torch.manual_seed(5)
    src = timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=128, num_classes=10).eval()
    with torch.no_grad():  # every parameter random: post-norm weights start at zero, which would hide a wrong mapping
        for q in src.parameters():
            q.normal_(0, 0.02 if q.dim() > 1 else 0.5)
    state = to_official_layout(src)
    assert "layers.0.downsample.reduction.weight" in state and "head.weight" in state
    assert sum(k.endswith("attn_mask") for k in state) == 1  # at 128 px only stage 0's second block shifts
    if release == "simmim":
        state = {"encoder." + k: v for k, v in state.items() if not k.startswith("head.")}
        state |= {"encoder.mask_token": torch.zeros(1, 1, 96), "decoder.0.weight": torch.zeros(3072, 768, 1, 1)}
    path = tmp_path / f"{release}.pth"
    torch.save({"model": state}, path)
    bb = build_backbone("swinv2-t", input_size=128, weights=str(path), attention="timm")  # timm's forward: equal to 1e-6
    assert bb.info.weights == hashlib.sha256(path.read_bytes()).hexdigest()
    feats = bb.forward(images)
    with torch.inference_mode():
        want = src.forward_intermediates(images, intermediates_only=True)  # NCHW
    for got, w in zip(feats.values(), want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-6)


def test_giant_is_the_papers_and_builds_on_meta():
    """SwinV2-G: C 512, depths (2, 2, 42, 4), heads (16, 32, 64, 128), a LayerNorm after every 6th block: 3.0B."""
    for alias in ("swinv2-g", "swinv2-g-timm"):
        with pytest.raises(ValueError, match="never published"):
            build_backbone(alias, input_size=1024)
    with torch.device("meta"):
        full = swinv2_giant.build_swinv2_giant(1024, 32)
    assert [len(stage.blocks) for stage in full.layers] == [2, 2, 42, 4]
    assert [stage.blocks[0].attn.num_heads for stage in full.layers] == [16, 32, 64, 128]
    assert parameter_count(full) == 2_997_843_680  # without classifier; the final norm included
    g = build_backbone("swinv2-g", input_size=1024, meta=True)
    assert parameter_count(g.model) == 2_997_835_488  # what computes the 4 levels (no final norm)
    norms = sorted(int(k.split(".")[2]) for k in g.model.state_dict() if k.endswith("norm3.weight"))
    assert norms == [5, 11, 17, 23, 29, 35, 41] and all(k.startswith("layers_2.") for k in g.model.state_dict() if "norm3" in k)
    assert [(lv.name, lv.channels, lv.stride) for lv in g.info.levels] == [
        ("p2", 512, 4),
        ("p3", 1024, 8),
        ("p4", 2048, 16),
        ("p5", 4096, 32),
    ]
    assert g.info.window == 32 and g.nhwc
    with torch.device("meta"):
        out = g.model(torch.empty(1, 3, 1024, 1024))
    assert [tuple(o.shape) for o in out] == [(1, 256, 256, 512), (1, 128, 128, 1024), (1, 64, 64, 2048), (1, 32, 32, 4096)]


def test_giant_window_follows_the_paper_per_task():
    assert {t: default_window("swinv2-g", t) for t in ("detection", "segmentation", "video", "")} == {
        "detection": 32, "segmentation": 40, "video": 16, "": 32
    }  # fmt: skip
    assert default_window("swinv2-b", "segmentation") is None  # a pretrained model keeps its window
    assert build_backbone("swinv2-g", input_size=640, meta=True, window=40).info.window == 40


def test_extra_norms_normalise_the_block_output():
    torch.manual_seed(0)
    model = swinv2_giant.add_extra_norms(timm.create_model("swinv2_tiny_window8_256", depths=(2, 2, 6, 2), img_size=64), 6).eval()
    seen = {}
    block = model.layers[2].blocks[5]
    block.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))  # runs after norm3's hook
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 64, 64))
    out = seen["out"]  # (1, H, W, C)
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(out.shape[:-1]), atol=1e-3, rtol=0)
    assert not hasattr(model.layers[2].blocks[4], "norm3") and not hasattr(model.layers[3].blocks[1], "norm3")


def test_window_can_be_set_and_equals_timms_own(images):
    bb = build_backbone("swinv2-t", input_size=128, random_init=True, seed=3, window=8)
    torch.manual_seed(3)
    ref = timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=128, window_size=8).eval()
    with torch.inference_mode():
        want = ref.forward_intermediates(images, intermediates_only=True)
    assert bb.info.window == 8
    for got, w in zip(bb.forward(images).values(), want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="has no attention window"):
        build_backbone("resnet18", input_size=64, random_init=True, window=7)


def test_aliases_and_unknown_models():
    assert resolve("swinv2-b") == ("swinv2-b", "swinv2_base_window12_192.ms_in22k")
    assert resolve("swinv2-g-timm") == ("swinv2-g-timm", "swinv2_cr_giant_224")
    assert resolve("resnet18")[1] == "resnet18"
    with pytest.raises(ValueError, match="unknown model 'swinv9'"):
        resolve("swinv9")
    with pytest.raises(ValueError, match="exclude each other"):
        build_backbone("swinv2-t", input_size=128, weights="x", random_init=True)


def test_any_timm_model_with_features_only():
    bb = build_backbone("resnet18", input_size=64, random_init=True, seed=2)
    torch.manual_seed(2)
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = bb.forward(x)
    with torch.inference_mode():
        want = ref(x)
    assert [lv.channels for lv in bb.info.levels] == [64, 128, 256, 512] and not bb.nhwc
    for got, w in zip(feats.values(), want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-5)


def test_pretrained_window_at_sizes_it_does_not_divide():
    """SwinV2-B keeps its 12-wide window at 512 px (128/64/32/16 maps): timm pads the maps per block."""
    bb = build_backbone("swinv2-b", input_size=512, meta=True)
    assert bb.info.window == 12
    with torch.device("meta"):
        out = bb.model(torch.empty(1, 3, 512, 512))
    assert [tuple(o.shape[1:3]) for o in out] == [(128, 128), (64, 64), (32, 32), (16, 16)]


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("evil.pt", b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR.", "not a safetensors file or a torch checkpoint of tensors only"),
        ("bad.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage", "is not readable safetensors"),
        ("cut.pt", b"PK\x03\x04cut", "not a safetensors file or a torch checkpoint of tensors only"),
    ],
)
def test_hostile_or_damaged_weights_are_one_line(tmp_path, name, data, fragment):
    from click.testing import CliRunner

    from fcache.cli import main
    from helpers import refused
    from media import image_folder

    (tmp_path / name).write_bytes(data)
    args = ["plan", "--dataset", "folder", "--root", str(image_folder(tmp_path / "im", n=1)), "--weights", str(tmp_path / name), "--no-run"]
    r = CliRunner().invoke(main, [*args, "--device", "cpu"])
    refused(r, fragment)
    assert "weights_only" not in r.output and "Re-running" not in r.output


def test_random_init_is_seeded_without_reseeding_the_callers_generator():
    """The weights of --random-init --seed S are timm's after torch.manual_seed(S) (stores made so keep their bytes),
    and building draws nothing from the caller's generator."""
    torch.manual_seed(2)
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    bb = build_backbone("resnet18", input_size=64, random_init=True, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    got = bb.model.state_dict()
    assert got.keys() == ref.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
