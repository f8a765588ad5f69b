"""A store and RUNs written by fcache 0.1.0 (tests/fixtures/release-0.1.0) keep opening, verifying, resuming and evaluating.

Users' stores are terabytes: a later release that changes what a fingerprint hashes, how a manifest or a RUN's
config.json is read, or where a resumed RUN lives, fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((FIXTURE / "expected" / "release.json").read_text())
HEADS = ("linear_dropout-0.0_level-p5", "linear_dropout-0.5_level-p5")


def fcache(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcache", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """A copy of the fixture (tests never write into it)."""
    out = tmp_path / "release"
    shutil.copytree(FIXTURE, out)
    return out


def manifest_attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["fcache"]


def test_the_fingerprint_of_an_old_store_is_pinned() -> None:
    from fcache.spec import Manifest

    attrs = manifest_attrs(FIXTURE / "store.zarr")
    assert attrs["fingerprint"] == EXPECTED["fingerprint"]
    assert Manifest.read(attrs, "store.zarr").fingerprint == EXPECTED["fingerprint"]


def test_an_old_store_opens_and_verifies(release: Path) -> None:
    from fcache import store as fstore

    s = fstore.open(release / "store.zarr")
    assert s.n == 6 and s.level_names == ("p4", "p5")
    assert s.read("p5", 3).shape == (1, 768, 4, 4)
    r = fcache("verify", "store.zarr", "--json", cwd=release)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True


@pytest.mark.slow
def test_an_interrupted_old_store_resumes(release: Path) -> None:
    """The last unit's ledger record removed (the ledger is the truth): the same command completes it, equal to before."""
    from fcache import store as fstore

    before = np.stack([fstore.open(release / "store.zarr").read("p4", i) for i in range(6)])
    (release / "store.zarr" / "ledger" / "done" / "000002.json").unlink()
    flags = ("--root", "images", "--out", "store.zarr", "--device", "cpu", "--num-workers", "0")
    r = fcache("extract", *EXPECTED["extract"], *flags, cwd=release)
    assert r.returncode == 0, r.stderr
    assert (release / "store.zarr" / "ledger" / "done" / "000002.json").exists()
    after = np.stack([fstore.open(release / "store.zarr").read("p4", i) for i in range(6)])
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-3 * float(np.abs(before).max()))
    assert fcache("verify", "store.zarr", cwd=release).returncode == 0


def test_an_old_run_evaluates_as_it_did(release: Path) -> None:
    r = fcache("eval", "run", "--store", "store.zarr", "--json", "--num-workers", "0", cwd=release)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"] == pytest.approx(EXPECTED["eval_metrics"])


def _train(release: Path, out: str, heads: tuple[str, ...]) -> None:
    args = [a for h in heads for a in ("--head", h)]
    r = fcache(
        "train-head", "--store", "store.zarr", *args, *EXPECTED["train"], "--num-workers", "0", "--device", "cpu", "--out", out, "--resume",
        cwd=release,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def _assert_same_weights(got: Path, expected: Path) -> None:
    a, b = load_file(got), load_file(expected)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_an_old_run_resumes_to_the_weights_it_gave(release: Path) -> None:
    _train(release, "run", ("linear",))
    _assert_same_weights(release / "run" / "model.safetensors", release / "expected" / "run-resumed.safetensors")


def test_old_runs_of_one_read_pass_resume_under_their_old_names(release: Path) -> None:
    _train(release, "runs", ("linear", "linear:dropout=0.5"))
    assert sorted(p.name for p in (release / "runs").iterdir()) == sorted(HEADS)
    for h in HEADS:
        _assert_same_weights(release / "runs" / h / "model.safetensors", release / "expected" / f"runs-{h}-resumed.safetensors")
