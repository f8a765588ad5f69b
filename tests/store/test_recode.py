"""`fcache recode`: the store extracting with that form makes, resumed after kill -9, into and from S3, bad input refused."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.store import layout
from fcache.store.backends import open_backend
from fcache.store.dtypes import stored
from fcache.store.forms import choose_forms
from fcache.store.lease import LEASE_KEY
from fcache.store.recode import RECODED_FROM, measured_maps, recode
from helpers import build_store, decoded, refused
from media import coco_dataset

PROC = Path(__file__).with_name("recode_proc.py")
TINY = ["--model", "swinv2-t", "--random-init", "--input-size", "128", "--seed", "3"]  # conftest.TINY
EXTRACT = [*TINY, "--shard-size", "2", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def rel_rmse(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.square(x - ref).sum() / np.square(ref).sum()))


@pytest.fixture(scope="module")
def coco_stores(tmp_path_factory) -> tuple[Path, Path]:
    """A COCO set (one zero-byte image) extracted by the tiny backbone twice: fp16 (the source) and int8 (the reference)."""
    d = tmp_path_factory.mktemp("coco")
    images, ann = coco_dataset(d / "data", n=5)
    (images / "003.jpg").write_bytes(b"")  # empty_file: a status and a line in errors.jsonl
    out = {}
    for dtype in ("fp16", "int8"):
        out[dtype] = d / f"{dtype}.zarr"
        args = ["extract", "--dataset", "coco", "--root", str(images), "--annotations", str(ann), *EXTRACT, "--dtype", dtype]
        r = CliRunner().invoke(main, [*args, "--out", str(out[dtype]), "--json"])
        assert r.exit_code == 3, r.output  # one sample skipped
    return out["fp16"], out["int8"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A synthetic fp16 store (7 units of 2, two views, one failed sample) and its uninterrupted recode into int8, decoded."""
    d = tmp_path_factory.mktemp("synthetic")
    src = build_store(d / "src.zarr", n=14, shard_size=2, views=2, failed=(3,))
    recode(src, d / "int8.zarr", dtype="int8")
    return src, decoded(d / "int8.zarr")


def test_recode_equals_extracting_with_that_form(coco_stores, tmp_path):
    src, ref = coco_stores
    dst = tmp_path / "int8.zarr"
    r = CliRunner().invoke(main, ["recode", str(src), "--out", str(dst), "--dtype", "int8", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["units_recoded"], summary["samples_recoded"], summary["units_present"]) == (3, 5, 0)
    a, b, s = fstore.open(dst), fstore.open(ref), fstore.open(src)
    assert a.manifest.fingerprint == b.manifest.fingerprint  # the store `extract --dtype int8` makes, not a look-alike
    assert a.manifest.backbone == s.manifest.backbone and a.manifest.dataset == s.manifest.dataset
    assert a.attrs[RECODED_FROM]["fingerprint"] == s.manifest.fingerprint
    for k in ("status", "geometry", "keys"):
        np.testing.assert_array_equal(decoded(dst)[k], decoded(ref)[k], err_msg=k)
    assert a.target_names == s.target_names == ("annotations", "image") and a.target_attrs == s.target_attrs
    for key in open_backend(src).listing(layout.TARGETS):  # targets copied as they are, byte for byte
        assert open_backend(dst).get(key) == open_backend(src).get(key), key
    assert (dst / "errors.jsonl").read_text() == (src / "errors.jsonl").read_text() != ""
    tolerance = stored("int8").tolerance
    for lv in a.level_names:
        got, want, source = (x.to_dask(lv).compute() for x in (a, b, s))
        assert rel_rmse(got, want) < tolerance, lv  # within the form's tolerance of extracting with it
        level = next(x for x in summary["levels"] if x["name"] == lv)
        assert level["rel_rmse"] == pytest.approx(rel_rmse(got, source), rel=0.05)  # measured against the source's values
        assert level["bits_after"] < level["bits_before"]
    assert summary["bytes_before"] / summary["bytes_after"] == pytest.approx(summary["ratio"])
    r = CliRunner().invoke(main, ["verify", str(dst), "--recompute", "2", "--device", "cpu"])  # against the source's backbone
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("stage", ["level:p3", "commit"])
def test_recode_resumes_after_kill_9_with_only_the_missing_units(synthetic, tmp_path, stage):
    src, reference = synthetic
    dst = tmp_path / "int8.zarr"
    r = subprocess.run([sys.executable, str(PROC), str(src), str(dst), "int8", "--kill", f"3:{stage}"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert set(fstore.open(dst).ledger) == {0, 1, 2}
    r = CliRunner().invoke(main, ["recode", str(src), "--out", str(dst), "--dtype", "int8", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["units_recoded"], summary["units_present"], summary["samples_recoded"]) == (4, 3, 8)
    assert_same(decoded(dst), reference)
    assert fstore.verify(dst).ok
    assert not (dst / LEASE_KEY).exists()


def test_recode_from_and_into_s3_equals_recoding_locally(synthetic, s3_bucket):
    src, reference = synthetic
    fstore.copy_store(src, s3_bucket + "/src.zarr")
    url = s3_bucket + "/int8.zarr"
    summary = recode(s3_bucket + "/src.zarr", url, dtype="int8")
    assert summary.units_recoded == 7 and summary.destination == url
    assert_same(decoded(url), reference)
    assert fstore.verify(url).ok
    assert not open_backend(url).exists(LEASE_KEY)


def test_max_error_stores_each_level_in_the_form_the_budget_picks_and_a_rerun_keeps_it(synthetic, tmp_path):
    src, _ = synthetic
    dst = tmp_path / "compact.zarr"
    r = CliRunner().invoke(main, ["recode", str(src), "--out", str(dst), "--max-error", "0.25", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    storage = fstore.open(dst).manifest.storage
    want = choose_forms(measured_maps(fstore.FeatureStore(src)), 0.25)
    assert {lv: storage.form(lv) for lv in want} == {lv: c.form for lv, c in want.items()} and storage.max_error == 0.25
    assert {lv: storage.form(lv) for lv in want} != dict.fromkeys(want, "fp16")  # the budget picked compact forms
    got, ref = decoded(dst), decoded(src)
    for level in summary["levels"]:
        lv = level["name"]
        assert level["form"] == storage.form(lv) and storage.measured[lv]["rel_rmse"] <= 0.25
        assert level["rel_rmse"] == pytest.approx(rel_rmse(got[lv], ref[lv]), rel=0.05) and level["rel_rmse"] <= 0.25 * 1.1
    r = CliRunner().invoke(main, ["recode", str(src), "--out", str(dst), "--max-error", "0.25", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["units_recoded"] == 0  # the recorded choice, not a new measurement
    refused(CliRunner().invoke(main, ["recode", str(src), "--out", str(dst), "--max-error", "0.2"]), "holds another store")
    refused(CliRunner().invoke(main, ["recode", str(src), "--out", str(tmp_path / "x.zarr"), "--max-error", "0.2", "--dtype", "int8"]),
            "give --dtype D", "or --max-error E")  # fmt: skip
    assert not (tmp_path / "x.zarr").exists()


def test_a_projected_form_gets_its_basis_fitted_on_the_source(synthetic, tmp_path):
    src, _ = synthetic
    dst = tmp_path / "pca.zarr"
    summary = recode(src, dst, dtype="pca8")
    want = {lv: stored("pca8").fit(x) for lv, x in measured_maps(fstore.FeatureStore(src)).items()}
    got = fstore.FeatureStore(dst).bases
    assert set(got) == set(want)
    for lv in want:
        np.testing.assert_allclose(got[lv], want[lv], rtol=1e-6, atol=1e-6, err_msg=lv)
        level = next(x for x in summary.levels if x["name"] == lv)
        assert level["bytes_after"] > got[lv].nbytes  # the basis is counted in the level's bytes
    assert fstore.verify(dst).ok and recode(src, dst, dtype="pca8").units_recoded == 0


def test_bad_input_is_refused_and_nothing_is_created(synthetic, tmp_path):
    src, _ = synthetic
    other = build_store(tmp_path / "other.zarr", n=4, shard_size=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    src_files = open_backend(src).listing()
    cases = {
        (str(src), "int8"): "one lies inside the other",
        (str(src / "features" / "inner"), "int8"): "one lies inside the other",
        (str(src.parent), "int8"): "one lies inside the other",
        (str(foreign), "int8"): "exists and is not an fcache store",
        (str(other), "int8"): "holds another store",
        (str(tmp_path / "new.zarr"), "float64"): "unknown dtype 'float64'",
    }
    for (out, dtype), fragment in cases.items():
        refused(CliRunner().invoke(main, ["recode", str(src), "--out", out, "--dtype", dtype]), fragment)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert open_backend(src).listing() == src_files


def test_a_damaged_source_target_is_named(coco_stores, tmp_path):
    src = shutil.copytree(coco_stores[0], tmp_path / "src.zarr")
    shard = src / layout.shard_key("targets/annotations", 1, 1)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    r = CliRunner().invoke(main, ["recode", str(src), "--out", str(tmp_path / "dst.zarr"), "--dtype", "int8"])
    refused(r, "targets/annotations/c/1", "differs from its ledger record", "fcache verify")
