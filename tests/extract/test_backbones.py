"""Backbones: aliases, NCHW features equal to timm's own forward, strict weights loading, SwinV2-G guard."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from fcache.extract.backbones import build_backbone, resolve


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


def test_wrong_weights_fail_with_key_diff(tmp_path):
    state = timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=128).state_dict()
    state.pop("head.fc.weight")
    state["extra.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing \(1\): head\.fc\.weight; unexpected \(1\): extra\.bias"):
        build_backbone("swinv2-t", input_size=128, weights=str(tmp_path / "bad.pt"))
    other = timm.create_model("swinv2_small_window16_256", pretrained=False, img_size=128).state_dict()
    torch.save(other, tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"unexpected \(204\): layers\.2\.blocks\.10"):  # SwinV2-S has 12 more blocks
        build_backbone("swinv2-t", input_size=128, weights=str(tmp_path / "small.pt"))


def test_giant_needs_weights_and_builds_on_meta():
    with pytest.raises(ValueError, match="never published"):
        build_backbone("swinv2-g", input_size=1024)
    g = build_backbone("swinv2-g", input_size=1024, meta=True)
    assert [(lv.name, lv.channels) for lv in g.info.levels] == [("p2", 512), ("p3", 1024), ("p4", 2048), ("p5", 4096)]
    assert sum(p.numel() for p in g.model.parameters()) > 2.5e9


def test_aliases_and_unknown_models():
    assert resolve("swinv2-b") == ("swinv2-b", "swinv2_base_window12_192.ms_in22k")
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
