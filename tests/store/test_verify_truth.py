"""`fcache verify` is right in both directions: no false alarm on a sound store, no pass on a tampered one; and every
reader refuses a store whose manifest does not describe its arrays, or whose records are garbage, in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.spec import Status
from helpers import build_store, make_manifest, refused, unit_payload, write_all


def verify(path, *flags):
    return CliRunner().invoke(main, ["verify", str(path), *flags])


def test_a_unit_whose_samples_all_failed_is_sound(tmp_path):
    """zarr writes no shard that holds only fill values: the ledger lists the files the unit has (none here)."""
    m, keys = make_manifest(n=4, shard_size=2)
    w = fstore.create(tmp_path / "s.zarr", m, keys)
    for unit in w.pending():
        failed = (0, 1) if unit.index == 0 else ()
        feats, status, geometry, errors = unit_payload(m, unit, failed=failed)
        w.write_unit(unit, feats, status, geometry, errors=errors)
    w.finalize()
    record = fstore.open(tmp_path / "s.zarr").ledger[0]
    assert not any(f.startswith("features/") for f in record.files) and all(s == Status.DECODE_ERROR for s in record.status)
    for flags in ([], ["--fast"]):
        r = verify(tmp_path / "s.zarr", *flags)
        assert r.exit_code == 0 and r.stdout.startswith("OK:"), r.output


def test_a_shard_missing_where_the_unit_has_features_is_named(tmp_path):
    path = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    record = fstore.open(path).ledger[1]
    shard = next(f for f in record.files if f.startswith("features/p3/"))
    (path / shard).unlink()
    r = verify(path)
    assert r.exit_code == 1 and "MISSING" in r.stdout and shard in r.stdout


def edit_manifest(path, change):
    meta = json.loads((path / "zarr.json").read_text())
    change(meta["attributes"]["fcache"])
    (path / "zarr.json").write_text(json.dumps(meta))


def set_level_channels(m):
    m["backbone"]["levels"][3]["channels"] = 16


TAMPERING = {
    "channels": (lambda p: edit_manifest(p, set_level_channels), "features/p5: has shape"),
    "views": (lambda p: edit_manifest(p, lambda m: m["preprocessing"].update(views=3)), "has shape"),
    "input_size": (lambda p: edit_manifest(p, lambda m: m["backbone"].update(input_size=128)), "has shape"),
    "n": (lambda p: edit_manifest(p, lambda m: m["dataset"].update(n=5)), "has shape"),
    "shard_size": (lambda p: edit_manifest(p, lambda m: m["storage"].update(shard_size=0)), "storage.shard_size: is 0"),
    "dtype": (lambda p: edit_manifest(p, lambda m: m["storage"].update(dtype="fp7")), "storage.dtype: unknown feature dtype 'fp7'"),
    "array shape": (lambda p: _edit_array(p / "features" / "p3", lambda a: a["shape"].__setitem__(2, 8)), "features/p3: has shape"),
    "no keys": (lambda p: shutil.rmtree(p / "samples" / "key"), "samples/key: the array is missing"),
}


def _edit_array(folder, change):
    meta = json.loads((folder / "zarr.json").read_text())
    change(meta)
    (folder / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_tampering_is_named_by_verify_and_refused_by_readers(what, tmp_path):
    path = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    tamper, fragment = TAMPERING[what]
    tamper(path)
    r = verify(path)
    assert r.exit_code == 1 and "MANIFEST" in r.stdout and fragment in r.stdout, r.output
    refused(CliRunner().invoke(main, ["info", str(path)]), fragment)
    with pytest.raises(fstore.StoreError, match="edited or damaged"):
        fstore.open(path)


GARBAGE = {
    "not json": ("zarr.json", "{not json", "is not valid JSON"),
    "a list": ("ledger/done/000000.json", "[1]", "the document is a list of 1, not a JSON object"),
    "empty record": ("ledger/done/000000.json", "{}", "the field 'unit' is missing"),
    "unit 99": (
        "ledger/done/000000.json",
        '{"unit": 99, "start": 0, "stop": 2, "status": [1, 1], "status_counts": {}, "files": {}, "quant": {}}',
        "unit 99 is not a unit of this store",
    ),  # fmt: skip
    "no files": (
        "ledger/done/000000.json",
        '{"unit": 0, "start": 0, "stop": 2, "status": [1, 1], "status_counts": {}, "quant": {}}',
        "the field 'files' is missing",
    ),  # fmt: skip
    "deep ledger": ("ledger/done/000000.json", "[" * 50_000 + "]" * 50_000, "nested 50000 levels deep"),
    "deep manifest": ("zarr.json", '{"attributes": {"fcache": ' + "[" * 50_000 + "]" * 50_000 + "}}", "nested 50002 levels deep"),
    "manifest field": ("zarr.json", None, "the field 'backbone.levels[0].channels' is 'many' (a string), not an integer"),
}


@pytest.mark.parametrize("what", sorted(GARBAGE))
def test_garbage_records_are_one_line(what, tmp_path):
    path = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    name, text, fragment = GARBAGE[what]
    if text is None:
        edit_manifest(path, lambda m: m["backbone"]["levels"][0].update(channels="many"))
    else:
        (path / name).write_text(text)
    for command in (["info", str(path)], ["verify", str(path)]):
        r = subprocess.run([sys.executable, "-m", "fcache", *command], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr


def test_a_sound_store_reads_as_before(tmp_path):
    path = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    s = fstore.open(path)
    assert s.read("p5", 0).shape == (1, *s.manifest.level_shape("p5")) and np.isfinite(s.read("p2", 3)).all()


def test_verify_sample_checks_that_fraction_of_the_units(tmp_path):
    from fcache.store.checks import verify as run_verify

    path = tmp_path / "s.zarr"
    m, keys = make_manifest(n=40, shard_size=4)
    write_all(fstore.create(path, m, keys))
    whole = run_verify(path, fast=True)
    per_unit = whole.files_checked // 10
    assert whole.ok and whole.units_committed == 10 and per_unit > 0
    assert run_verify(path, fast=True, sample=0.2).files_checked == 2 * per_unit
    assert run_verify(path, fast=True, sample=0.01).files_checked == per_unit  # at least one unit
    (path / "features" / "p3" / "c" / "0" / "0" / "0" / "0" / "0").write_bytes(b"cut")
    seen = {run_verify(path, sample=0.5).ok for _ in range(2)}
    assert len(seen) == 1  # the same units every time (seeded)
    assert not run_verify(path, sample=1.0).ok
    r = CliRunner().invoke(main, ["verify", str(path), "--fast", "--sample", "0.2"])
    assert f"{2 * per_unit} files checked (fast, 20% of the units)" in r.output
