"""The catalog's counts without building: levels, window, normalisation, parameters and FLOPs of every SwinV2 alias
equal those of the model built on the meta device (tiny sizes, padded maps, windows larger than a map, level subsets;
SwinV2-L at 1024); ``fcache plan --no-run`` of a catalogued backbone imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fcache.extract import catalog
from fcache.extract.catalog import BACKBONES, Described, described
from media import image_folder

CASES = [  # every catalogued alias once: padded maps, windows larger than a map, level subsets, the extra norms
    ("swinv2-t", 160, 8, ("p2", "p5")),
    ("swinv2-s", 64, None, None),
    ("swinv2-b", 96, 5, ("p3",)),
    ("swinv2-l", 1024, None, None),
    ("swinv2-g", 64, None, None),
]


def test_every_catalogued_alias_is_checked():
    assert sorted(a for a, _, _, _ in CASES) == sorted(a for a, d in BACKBONES.items() if d.arch is not None)


@pytest.mark.parametrize(("alias", "size", "window", "levels"), CASES)
def test_counts_equal_the_built_models(alias, size, window, levels):
    from fcache.extract.backbones import build_backbone, parameter_count
    from fcache.extract.plan import forward_flops

    bb = build_backbone(alias, input_size=size, levels=levels, meta=True, window=window)
    want = Described(bb.info, bb.mean, bb.std, parameter_count(bb.model), forward_flops(bb.model, size))
    assert described(alias, input_size=size, levels=levels, window=window) == want


def test_pinned_counts_and_what_is_not_catalogued():
    """SwinV2-L at 1024 (its published 197M parameters are the classifier's and last norm's more) and the giant; a
    model without a configuration is built instead; a level the model lacks is refused as when building."""
    large = described("swinv2-l", input_size=1024)
    assert (large.parameters, large.flops, large.info.window) == (195_199_860, 1_596_378_746_880, 12)
    giant = described("swinv2-g", input_size=1024, window=catalog.default_window("swinv2-g", "detection"))
    assert giant.parameters == 2_997_835_488 and giant.info.window == 32
    assert described("swinv2-g-timm", input_size=256) is None and described("resnet18", input_size=256) is None
    with pytest.raises(catalog.InputError, match="has no level p6"):
        described("swinv2-t", input_size=256, levels=("p6",))


def test_plan_of_a_catalogued_backbone_imports_no_torch(tmp_path):
    root = image_folder(tmp_path / "im", n=2)
    code = (
        "import sys\nfrom fcache.cli import main\n"
        f"main(['plan', '--dataset', 'folder', '--root', {str(root)!r}, '--model', 'swinv2-b', '--input-size', '512',"
        " '--no-run', '--device', 'cuda:7', '--json'], standalone_mode=False)\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False False"
    assert '"backbone_params": 86' in out and '"window": 12' in out  # 86.9M parameters without the classifier
