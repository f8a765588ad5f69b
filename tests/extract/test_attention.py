"""SwinV2 window attention through SDPA (``extract.attention``) equals timm's own forward: T/B/L and the giant's
shapes, windows 8 to 32, shifted and not, maps the window does not divide; fp32 and bf16 autocast; ``--attention timm``
is timm bit for bit; a store written with either attention passes ``verify --recompute`` with the other.

timm zero-initialises SwinV2's post-norms (random-init features would not depend on attention at all), so every model
here gets random norms, logit scales and biases first.
"""

from __future__ import annotations

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2

from fcache.cli import main
from fcache.extract import attention, swinv2_giant
from fcache.extract.attention import SdpaWindowAttention, SdpaWindowMultiHeadAttention, set_attention
from fcache.extract.backbones import build_backbone
from media import image_folder

# (model, timm kwargs, input size), reduced to the first two stages of two blocks (the second one shifted where the map
# exceeds the window): maps of S/4 and S/8, padded up to the window where it does not divide them
CASES = {
    "T-w16": ("swinv2_tiny_window16_256", {"num_heads": (3, 6)}, 160),  # 40 -> 48, 20 -> 32: both shifted
    "T-w8": ("swinv2_tiny_window16_256", {"num_heads": (3, 6), "window_size": 8}, 96),  # 24 (divides), 12 -> 16
    "B-w12": ("swinv2_base_window12_192", {"num_heads": (4, 8)}, 160),  # 40 -> 48, 20 -> 24
    "L-w24": ("swinv2_large_window12_192", {"num_heads": (6, 12), "window_size": 24}, 160),  # 40 -> 48; 20 (window 20)
    "cr-T-w12": ("swinv2_cr_tiny_224", {"num_heads": (3, 6), "window_size": 12}, 160),  # swinv2_cr: 40 -> 48, 20 -> 24
}
REDUCED = {"depths": (2, 2), "strict_img_size": False}  # strict_img_size=False: timm's dynamic mask, as fcache builds them


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights under which attention matters: norms around 1, logit scales up to the clamp, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 5.0)  # clamped at log(100) = 4.6
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def timm_model(name: str, size: int, seed: int, **kw) -> torch.nn.Module:
    """A reduced model built through timm's own constructor (``kw`` override its configuration)."""
    torch.manual_seed(seed)
    return randomise(timm.create_model(name, pretrained=False, img_size=size, num_classes=0, **REDUCED | kw), seed)


def giant(size: int, seed: int) -> torch.nn.Module:
    """The paper's SwinV2-G configuration (embed 512, 16 and 32 heads, window 32, extra norms) reduced to its first two
    stages of two blocks: the stages whose maps are larger than the window at the paper's sizes."""
    torch.manual_seed(seed)
    kw = {"embed_dim": 512, "depths": (2, 2), "num_heads": (16, 32), "window_size": 32}
    model = SwinTransformerV2(img_size=size, num_classes=0, strict_img_size=False, **kw)
    return randomise(swinv2_giant.add_extra_norms(model, 2), seed)


def both(model: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's outputs with timm's attention, then through SDPA (the model is left with timm's)."""
    outs = []
    for name in ("timm", "sdpa"):
        set_attention(model, name)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs.append([t.float() for t in model.forward_intermediates(x, intermediates_only=True)])
    set_attention(model, "timm")
    return outs[0], outs[1]


def assert_fp32_equal(want: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    """Max abs difference within fp32 rounding: at most 1e-4 of the feature map's largest magnitude."""
    for k, (w, g) in enumerate(zip(want, got, strict=True)):
        err = float((g - w).abs().max() / w.abs().max())
        assert err <= 1e-4, f"output {k}: max abs difference {err:.1e} of the features' scale"


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_equals_timm(case):
    name, kw, size = CASES[case]
    model = timm_model(name, size, seed=1, **kw)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    want, got = both(model, x)
    assert_fp32_equal(want, got)
    swapped = set_attention(model, "sdpa")
    assert swapped == 4 and all(
        type(m).__module__ == "fcache.extract.attention" for m in model.modules() if "Attention" in type(m).__name__
    )


def test_sdpa_equals_timm_at_the_giants_shapes():
    model = giant(160, seed=4)  # stage 1: 40 -> 64, four windows of 1024 tokens, shifted; stage 2: 20 (window 20)
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    want, got = both(model, x)
    assert_fp32_equal(want, got)
    assert sum(isinstance(m, SdpaWindowAttention) for m in model.modules()) == 0  # left with timm's


def test_shifted_windows_in_chunks(monkeypatch):
    """Shifted windows go through SDPA a few at a time (bounded memory for their masks): one window per call here."""
    name, kw, size = CASES["B-w12"]
    model = timm_model(name, size, seed=1, **kw)
    monkeypatch.setattr(attention, "MASK_ELEMENTS", 1)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    want, got = both(model, x)
    assert_fp32_equal(want, got)


def test_shifted_masks_are_used():
    """A swapped model whose mask is dropped differs: the comparison above sees the shifted windows."""
    name, kw, size = CASES["T-w8"]
    model = timm_model(name, size, seed=1, **kw)
    block = model.layers[1].blocks[1]
    assert block.shift_size == (4, 4)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    want, _ = both(model, x)
    set_attention(model, "sdpa")
    block.attn.forward = lambda t, mask=None: SdpaWindowAttention.forward(block.attn, t, None)
    with torch.inference_mode():
        got = model.forward_intermediates(x, intermediates_only=True)
    assert float((got[1] - want[1]).abs().max() / want[1].abs().max()) > 1e-2


@pytest.mark.parametrize("case", ["T-w8", "cr-T-w12"])
def test_bf16_autocast_within_bf16_rounding(case):
    """Under bf16 autocast the SDPA features are as close to the fp32 ones as timm's own bf16 features are."""
    name, kw, size = CASES[case]
    model = timm_model(name, size, seed=6, **kw)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    exact, _ = both(model, x)
    timm_bf16, sdpa_bf16 = both(model, x, autocast=True)
    for k, (e, t, s) in enumerate(zip(exact, timm_bf16, sdpa_bf16, strict=True)):
        rel_timm, rel_sdpa = (float((y - e).norm() / e.norm()) for y in (t, s))
        assert 1e-3 < rel_timm < 0.5, (k, rel_timm)  # bf16 did round
        assert rel_sdpa <= 1.25 * rel_timm, f"output {k}: SDPA bf16 off by {rel_sdpa:.2e}, timm's bf16 by {rel_timm:.2e}"


def test_attention_timm_is_timm_bit_for_bit(tiny_backbone):
    """``build_backbone`` swaps SDPA in by default; ``attention="timm"`` computes exactly timm's forward."""
    assert sum(isinstance(m, SdpaWindowAttention) for m in tiny_backbone.model.modules()) == 12
    bb = build_backbone("swinv2-t", input_size=128, random_init=True, attention="timm")
    assert not any(type(m).__module__ == "fcache.extract.attention" for m in bb.model.modules())
    randomise(bb.model, seed=8)
    ref = timm.create_model("swinv2_tiny_window16_256", pretrained=False, features_only=True, img_size=128, strict_img_size=False)
    ref.load_state_dict(bb.model.state_dict())
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(9))  # stage 1: 32 px maps, shifted windows
    with torch.inference_mode():
        want = [f.permute(0, 3, 1, 2) for f in ref.eval()(x)]  # NHWC
    exact = list(bb.forward(x).values())
    set_attention(bb.model, "sdpa")
    close = list(bb.forward(x).values())
    for w, e, c in zip(want, exact, close, strict=True):
        assert torch.equal(e, w)
        assert not torch.equal(c, w)
    assert_fp32_equal(want, close)


def test_swinv2_cr_models_are_swapped_and_unknown_attention_is_refused():
    with torch.device("meta"):
        model = timm.create_model("swinv2_cr_tiny_224", pretrained=False)
    assert set_attention(model, "sdpa") == 12
    assert sum(isinstance(m, SdpaWindowMultiHeadAttention) for m in model.modules()) == 12
    assert set_attention(torch.nn.Linear(2, 2), "sdpa") == 0  # a model without window attention is left as it is
    with pytest.raises(ValueError, match="--attention flash: choose one of sdpa, timm"):
        build_backbone("swinv2-t", input_size=128, random_init=True, attention="flash")
    r = CliRunner().invoke(main, ["verify", "nowhere", "--attention", "flash"])
    assert r.exit_code == 2 and "flash" in r.stderr


@pytest.mark.slow  # two extractions and two recomputing verifies
def test_stores_verify_against_the_other_attention(tmp_path):
    """Each attention's store passes ``verify --recompute`` with the other at 1e-6 relative RMSE (fp32 stores)."""
    src = randomise(timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=64), seed=10)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    root = image_folder(tmp_path / "images", n=2)
    flags = ["--dataset", "folder", "--root", str(root), "--weights", str(weights), "--input-size", "64", "--num-workers", "0",
             "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    for written, checked in (("timm", "sdpa"), ("sdpa", "timm")):
        out = tmp_path / f"{written}.zarr"
        r = CliRunner().invoke(main, ["extract", *flags, "--out", str(out), "--attention", written])
        assert r.exit_code == 0, r.output
        verify = ["verify", str(out), "--recompute", "2", "--weights", str(weights), "--device", "cpu", "--tolerance", "1e-6"]
        r = CliRunner().invoke(main, [*verify, "--attention", checked])
        assert r.exit_code == 0 and "OK:" in r.stdout and "2 samples recomputed" in r.stdout, r.output
