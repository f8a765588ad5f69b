"""`fcache copy` between local disk and S3 (checked at both ends, resumable) and `fcache export-wds` read back as a stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.store import copy as copy_module
from fcache.store import layout
from fcache.store.backends import open_backend
from helpers import build_store, decoded, refused


def assert_same(a, b) -> None:
    x, y = decoded(a), decoded(b)
    assert set(x) == set(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_copy_local_to_s3_and_back_is_checked_and_resumable(tmp_path, s3_bucket, monkeypatch):
    src = build_store(tmp_path / "s.zarr", n=10, shard_size=2, dtype="int8", failed=(3,))
    url = s3_bucket + "/copy.zarr"
    real, calls = copy_module._copy_unit, []

    def dies_after_two(*a):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the copy is killed mid-way
        calls.append(a[2].index)
        return real(*a)

    monkeypatch.setattr(copy_module, "_copy_unit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        fstore.copy_store(src, url, workers=1)
    monkeypatch.undo()
    assert set(fstore.open(url).ledger) == set(calls)  # what was copied is committed, nothing else
    r = CliRunner().invoke(main, ["copy", str(src), url, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["units_copied"] == 3 and summary["units_present"] == 2 and summary["units_committed"] == 5
    assert fstore.verify(url).ok
    assert_same(src, url)
    back = tmp_path / "back.zarr"
    assert CliRunner().invoke(main, ["copy", url, str(back)]).exit_code == 0
    assert fstore.verify(back).ok
    assert_same(src, back)
    assert (back / "errors.jsonl").read_text() == (src / "errors.jsonl").read_text()


def test_copy_refuses_a_damaged_source_and_a_foreign_destination(tmp_path, s3_bucket):
    src = build_store(tmp_path / "s.zarr", n=6, shard_size=2)
    shard = src / layout.shard_key("features/p3", 1, 5)
    data = bytearray(shard.read_bytes())
    data[50] ^= 0x01
    shard.write_bytes(bytes(data))
    refused(CliRunner().invoke(main, ["copy", str(src), s3_bucket + "/c.zarr"]), layout.shard_key("features/p3", 1, 5), "fcache verify")
    open_backend(s3_bucket + "/other").put("precious.txt", b"x")
    refused(CliRunner().invoke(main, ["copy", str(src), s3_bucket + "/other"]), "is not an fcache store")
    assert open_backend(s3_bucket + "/other").get("precious.txt") == b"x"


def test_copy_keeps_a_projected_forms_basis(tmp_path):
    src = build_store(tmp_path / "s.zarr", n=6, shard_size=2, dtype="pca8")
    r = CliRunner().invoke(main, ["copy", str(src), str(tmp_path / "c.zarr")])
    assert r.exit_code == 0, r.output
    copied = fstore.open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(copied.bases["p5"], fstore.open(src).bases["p5"])
    for k, v in decoded(src).items():
        np.testing.assert_array_equal(decoded(tmp_path / "c.zarr")[k], v)


@pytest.mark.parametrize("dtype", ["int8", "bf16", "int3", "pca8"])
def test_export_wds_reads_back_as_the_store_does(tmp_path, s3_bucket, dtype):
    src = build_store(tmp_path / "s.zarr", n=9, shard_size=4, views=2, dtype=dtype, failed=(3,))
    out = s3_bucket + "/wds"
    r = CliRunner().invoke(main, ["export-wds", str(src), "--out", out, "--shard-size", "40KB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["samples"] == 8 and d["shards"] > 1
    export = fstore.open(out)
    assert isinstance(export, fstore.WdsExport) and export.n == 8 and export.level_names == ("p2", "p3", "p4", "p5")
    store = fstore.open(src)
    want = store.dataset(view=1)
    items = list(export.stream(view=1))
    assert [it["index"] for it in items] == [int(i) for i in store.ok_indices]
    for got, ref in zip(items, (want[j] for j in range(len(want))), strict=True):
        for lv in store.level_names:
            assert torch.equal(got["features"][lv], ref["features"][lv])
        assert torch.equal(got["geometry"], ref["geometry"])
    loader = torch.utils.data.DataLoader(export.stream(["p5"], shuffle=4, seed=1), batch_size=None, num_workers=2)
    seen = sorted(int(it["index"]) for it in loader)
    assert seen == [int(i) for i in store.ok_indices]  # every sample once, shards split over the workers
    with pytest.raises(fstore.StoreError, match="webdataset export, which is read as a stream"):
        fstore.FeatureStore(out)
    refused(CliRunner().invoke(main, ["export-wds", str(src), "--out", out]), "already holds an export")


def test_copy_and_export_never_write_into_their_own_store(tmp_path, s3_bucket):
    src = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for dst in (src / "sub.zarr", src, tmp_path / "s.zarr" / ".." / "s.zarr" / "x"):
        refused(CliRunner().invoke(main, ["copy", str(src), str(dst)]), "one lies inside the other")
        refused(CliRunner().invoke(main, ["export-wds", str(src), "--out", str(dst)]), "one lies inside the other")
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    assert CliRunner().invoke(main, ["copy", str(src), s3_bucket + "/a.zarr"]).exit_code == 0
    refused(CliRunner().invoke(main, ["copy", s3_bucket + "/a.zarr", s3_bucket + "/a.zarr/b"]), "one lies inside the other")
    assert CliRunner().invoke(main, ["copy", s3_bucket + "/a.zarr", s3_bucket + "/a.zarr-b"]).exit_code == 0  # a sibling, not inside


def test_export_wds_refuses_a_shard_size_of_nothing(tmp_path):
    src = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    refused(CliRunner().invoke(main, ["export-wds", str(src), "--out", str(tmp_path / "w"), "--shard-size", "0"]), "at least one byte")
    assert not (tmp_path / "w").exists()


def test_export_wds_refuses_a_folder_holding_files_of_the_users(tmp_path):
    src = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    out = tmp_path / "w"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"mine")  # the name of the export's first shard
    refused(CliRunner().invoke(main, ["export-wds", str(src), "--out", str(out)]), f"{out} holds files but no finished export")
    assert [p.name for p in out.iterdir()] == ["shard-000000.tar"] and (out / "shard-000000.tar").read_bytes() == b"mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, ["export-wds", str(src), "--out", str(empty)]).exit_code == 0
