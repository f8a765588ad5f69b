"""`fcache extract --max-error`: each level's form chosen on the first unit, recorded, shown, kept on resume; the
compact forms under `verify --recompute`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_runner import assert_same_store, cfg, folder_flags

from fcache import store as fstore
from fcache.cli import main
from fcache.extract.choose import sample_features
from fcache.extract.driver import prepare, run_extract
from fcache.store.dtypes import DTYPES
from fcache.store.forms import measure_all, pick
from helpers import extract_killed_after, refused
from media import image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("folder"), n=5)


@pytest.fixture(scope="module")
def compact(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("compact") / "s.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(out), max_error=0.25))
    return out


def test_each_level_takes_the_smallest_form_within_budget_on_the_first_unit(compact, folder):
    m = fstore.open(compact).manifest
    source, refs, backbone, _ = prepare(cfg(dataset="folder", root=str(folder), out=""))
    first = sample_features(source, refs, backbone, m, range(2))  # the first unit: shard size 2
    assert set(m.storage.measured) == set(first) == {"p2", "p3", "p4", "p5"}
    for level, x in first.items():
        values = 5 * np.prod(m.level_shape(level))  # the store's values of the level: a basis counts in their bits
        best = pick(measure_all(x, store_values=values), 0.25)
        assert m.storage.form(level) == best.form and best.rel_rmse <= 0.25
        assert m.storage.measured[level] == {"rel_rmse": pytest.approx(best.rel_rmse), "bits": pytest.approx(best.bits)}
    assert m.storage.max_error == 0.25 and m.storage.dtype == "fp16"
    store = fstore.open(compact)
    for level, x in first.items():  # a projected form's basis: fitted on the same first unit
        d = DTYPES[m.storage.form(level)]
        assert d.name not in ("fp16", "bf16", "fp32", "int8")
        if d.fitted:
            np.testing.assert_array_equal(store.bases[level], d.fit(x))


def test_info_shows_each_levels_form_error_and_bits(compact):
    r = CliRunner().invoke(main, ["info", str(compact), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    m = fstore.open(compact).manifest
    assert d["max_error"] == 0.25
    for lv in d["levels"]:
        values = np.prod(lv["shape"])
        assert lv["form"] == m.storage.form(lv["name"]) and lv["chosen"] == m.storage.measured[lv["name"]]
        assert lv["bits_per_value"] == pytest.approx(8 * lv["disk_bytes"] / values) and lv["bits_per_value"] < 4
        assert 0 < lv["quantisation_error"] <= 0.3  # the whole store, against the first unit's 0.25
    text = CliRunner().invoke(main, ["info", str(compact)]).output
    assert "chosen for --max-error 0.25" in text and m.storage.form("p3") in text


def test_verify_recompute_compares_what_the_form_stores_and_finds_tampered_values(tmp_path, folder, compact):
    """Recomputed features are encoded in their level's form before the comparison: an honest compact store agrees to
    well within each form's tolerance (its own error, up to 0.3 here, is not counted), a tampered one is named."""
    r = CliRunner().invoke(main, ["verify", str(compact), "--recompute", "3", "--tolerance", "1e-3"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "int2.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(out), dtype="int2", limit=4, codec="none"))
    assert CliRunner().invoke(main, ["verify", str(out), "--recompute", "4"]).exit_code == 0
    import zarr

    from fcache.store import layout

    arr = zarr.open_array(str(out / "features" / "p4"), mode="r+")
    arr[2] = 0x55 ^ np.asarray(arr[2])  # consistent bytes, other values: only a recompute can tell
    rec_path = layout.done_path(out, layout.units(4, 2)[1])
    rec = json.loads(rec_path.read_text())
    shard = "features/p4/c/1/0/0/0/0"
    rec["files"][shard]["sha256"] = layout.sha256_file(out / shard)
    rec_path.write_text(json.dumps(rec))
    r = CliRunner().invoke(main, ["verify", str(out), "--recompute", "4"])
    assert r.exit_code == 1 and "RECOMPUTE" in r.output and "sample 2 " in r.output and "features/p4" in r.output


def test_dtype_with_max_error_is_refused_in_one_line(tmp_path, folder):
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--dtype", "int8", "--max-error", "0.1", "--out", str(tmp_path / "s"))])
    refused(r, "--dtype int8 and --max-error")
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--max-error", "1.5", "--out", str(tmp_path / "s"))])
    refused(r, "--max-error 1.5")


@pytest.mark.slow
def test_a_resumed_run_keeps_the_recorded_choice(tmp_path, folder, compact, monkeypatch):
    """Killed after two units, the rerun reads the choice from the store (it measures nothing) and ends equal to an
    uninterrupted run."""
    args = folder_flags(folder, "--shard-size", "1", "--batch-size", "1", "--max-error", "0.25")
    killed = tmp_path / "killed.zarr"
    assert 2 <= extract_killed_after(args, killed) < 5
    chosen = fstore.FeatureStore(killed).manifest.storage

    def measuring(*a, **k):
        raise AssertionError("a resumed run must not measure the forms again")

    monkeypatch.setattr("fcache.extract.choose.choose_forms", measuring)
    run_extract(cfg(dataset="folder", root=str(folder), out=str(killed), max_error=0.25, shard_size=1, batch_size=1))
    assert fstore.FeatureStore(killed).manifest.storage == chosen
    monkeypatch.undo()
    ref = tmp_path / "ref.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(ref), max_error=0.25, shard_size=1, batch_size=1))
    assert_same_store(ref, killed)


def test_plan_codecs_measures_every_form_and_says_which_budget_picks_it(folder):
    r = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--codecs", "--max-error", "0.25", "--measure", "2", "--json")])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert set(p["forms_table"]) == {"p2", "p3", "p4", "p5"}
    for level, rows in p["forms_table"].items():
        assert {row["form"] for row in rows} == set(DTYPES) and [row["bits"] for row in rows] == sorted(row["bits"] for row in rows)
        values = 5 * np.prod(next(lv["shape"] for lv in p["levels"] if lv["name"] == level))
        for row in rows:
            assert row["total_bytes"] == pytest.approx(row["bits"] * values / 8) and row["encode_mb_s"] > 0 < row["decode_mb_s"]
        within = [row for row in rows if row["rel_rmse"] <= 0.25]
        assert [row["form"] for row in rows if 0.25 in row["picked_for"]] == [within[0]["form"]] == [p["forms"][level]]
        assert [row["form"] for row in rows if 0.01 in row["picked_for"]] == [min(
            (row for row in rows if row["rel_rmse"] <= 0.01), key=lambda row: row["bits"])["form"]]  # fmt: skip
    assert p["levels"][0]["bytes_per_sample"] < 96 * 32 * 32  # the chosen forms' raw sizes: under a byte per value
    text = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--codecs", "--measure", "2")]).output
    assert "--max-error picks it for" in text and "int4" in text


def test_plan_codecs_without_a_run_gives_raw_sizes(folder):
    r = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--codecs", "--no-run", "--json")])
    assert r.exit_code == 0, r.output
    rows = {row["form"]: row for row in json.loads(r.output)["forms_table"]["p2"]}  # (96, 32, 32) per sample
    assert rows["int4"]["bits"] == 4 + 16 / 1024 and rows["int2"]["bits"] == 2 + 16 / 1024 and rows["int8"]["bits"] == 8 + 32 / 1024
    assert rows["fp16"]["bits"] == rows["bf16m3"]["bits"] == 16 and not rows["fp16"]["measured"] and "rel_rmse" not in rows["fp16"]


def test_a_projected_dtype_is_fitted_on_the_first_unit(tmp_path, folder):
    out = tmp_path / "pca.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(out), dtype="pca16", limit=3))
    s = fstore.open(out)
    m = s.manifest
    source, refs, backbone, _ = prepare(cfg(dataset="folder", root=str(folder), out=""))
    first = sample_features(source, refs, backbone, m, range(2))
    for lv in s.level_names:
        np.testing.assert_array_equal(s.bases[lv], DTYPES["pca16"].fit(first[lv]))
        assert s.read(lv, 2, 0).shape == m.level_shape(lv) and 0 < s.quantisation_error[lv] < 1
    r = CliRunner().invoke(main, ["verify", str(out), "--recompute", "1"])
    assert r.exit_code == 0, r.output  # sample 2 was not fitted on: its error is its own, what is compared is the store
