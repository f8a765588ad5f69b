"""`fcache.load` is there without making `import fcache` heavy, and takes one input (a path, a PIL image, an array) or a
list of them: one prediction for one input, a list for a list."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fcache
from fcache.common.errors import InputError


def test_import_fcache_stays_light_and_load_is_lazy():
    code = "import sys, fcache; assert 'torch' not in sys.modules; f = fcache.load; assert 'torch' in sys.modules and callable(f)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_one_input_gives_one_prediction_and_a_list_a_list(probe_run):
    model = fcache.load(probe_run.run, random_init=True, device="cpu")
    path = sorted(probe_run.images.rglob("*.jpg"))[0]
    (listed,) = model([str(path)])
    pixels = np.array(Image.open(path).convert("RGB"))
    singles = [model(one) for one in (str(path), Image.open(path), pixels)]
    for got in [*singles, *model((path, torch.from_numpy(pixels)))]:  # a batch of two may differ in the last bits
        assert isinstance(got, dict) and [c["name"] for c in got["top"]] == [c["name"] for c in listed["top"]]
        assert torch.allclose(got["probs"], listed["probs"], atol=1e-5)
    assert len(model(np.stack([pixels, pixels]))) == 2
    for empty in (Image.new("RGB", (0, 0)), np.zeros((0, 7, 3), np.uint8)):
        with pytest.raises(InputError, match="no pixels") as e:
            model(empty)
        assert "\n" not in str(e.value)
