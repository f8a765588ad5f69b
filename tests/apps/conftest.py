"""Small RUNs shared by the apps tests (built once per session): a classification probe and a segmentation head, each
with the store it was trained on and the images that store was extracted from (random-init SwinV2-T at 128 px)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcache.cli import main
from media import image_folder

sys.path.insert(0, str(Path(__file__).parents[1] / "train_heads"))
from seghelpers import make_ade  # noqa: E402

BACKBONE = ["--model", "swinv2-t", "--random-init", "--input-size", "128", "--dtype", "fp32", "--num-workers", "0", "--device", "cpu"]
CPU = ["--num-workers", "0", "--device", "cpu"]


@dataclass(frozen=True)
class Trained:
    """A RUN, the store it was trained on and the folder of images that store holds."""

    run: Path
    store: Path
    images: Path


def fcache_ok(*args: str) -> dict:
    """``fcache ARGS --json``, which must succeed; its JSON summary."""
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


@pytest.fixture(scope="session")
def probe_run(tmp_path_factory) -> Trained:
    """A linear classification probe on p5 of 4 photos in two classes (cats, dogs), trained 2 iterations."""
    d = tmp_path_factory.mktemp("probe-run")
    folder = image_folder(d / "imgs", n=4)
    fcache_ok("extract", "--dataset", "folder", "--root", str(folder), "--levels", "p5", *BACKBONE, "--out", str(d / "s.zarr"))
    fcache_ok("train-head", "--store", str(d / "s.zarr"), "--task", "classification", "--head", "linear", "--out", str(d / "run"),
              "--iters", "2", "--batch-size", "2", *CPU)  # fmt: skip
    return Trained(d / "run", d / "s.zarr", folder)


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory) -> Trained:
    """A small UPerNet on 2 ADE20K-style photos, trained 1 iteration (what matters is which files predict writes)."""
    d = tmp_path_factory.mktemp("seg-run")
    root = make_ade(d / "ADE", "validation", n=2)
    fcache_ok("extract", "--dataset", "ade20k", "--root", str(root), "--split", "validation", *BACKBONE, "--out", str(d / "s.zarr"))
    fcache_ok("train-head", "--store", str(d / "s.zarr"), "--task", "segmentation", "--head", "upernet:channels=16,norm=bn", "--out",
              str(d / "run"), "--iters", "1", "--batch-size", "2", *CPU)  # fmt: skip
    return Trained(d / "run", d / "s.zarr", root / "images" / "validation")
