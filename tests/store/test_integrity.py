"""Corruption, fingerprint refusal, disk full, dtype range and int8 error on real backbone features."""

from __future__ import annotations

import errno
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.store import layout
from fcache.store.dtypes import encode
from helpers import build_store, make_manifest, unit_payload, write_all


def shard(path, level, unit):
    return layout.shard_file(path, f"features/{level}", unit, 5)


def test_verify_names_exactly_the_damaged_shards(tmp_path):
    path = build_store(tmp_path / "s.zarr", n=12, shard_size=4)
    flipped, truncated, deleted = shard(path, "p2", 1), shard(path, "p3", 0), shard(path, "p5", 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x5A
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    deleted.unlink()

    r = CliRunner().invoke(main, ["verify", str(path)])
    assert r.exit_code == 1
    report = fstore.verify(path)
    named = {(p.path, p.samples, p.kind) for p in report.problems}
    rel = lambda p: str(p.relative_to(path))  # noqa: E731
    assert named == {
        (rel(flipped), (4, 7), "checksum"),
        (rel(flipped), (4, 7), "decode"),  # the CRC32C of the chunk fails too
        (rel(truncated), (0, 3), "size"),
        (rel(deleted), (8, 11), "missing"),
    }
    for p in (flipped, truncated, deleted):
        assert rel(p) in r.output
    fast = {(p.path, p.kind) for p in fstore.verify(path, fast=True).problems}
    assert fast == {(rel(truncated), "size"), (rel(deleted), "missing")}  # same-size flip needs the full check


def test_reader_raises_instead_of_fill_values(tmp_path):
    path = build_store(tmp_path / "s.zarr", n=12, shard_size=4)
    flipped, truncated, deleted = shard(path, "p2", 1), shard(path, "p3", 0), shard(path, "p5", 2)
    data = bytearray(flipped.read_bytes())
    data[40] ^= 0xFF  # inside the first chunk of the shard (sample 4)
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    deleted.unlink()
    s = fstore.open(path)
    with pytest.raises(fstore.CorruptStoreError, match="shard 1 \\(samples 4-7\\) is corrupt"):
        s.read("p2", 4)
    with pytest.raises(fstore.CorruptStoreError, match="has .* bytes"):
        s.read("p3", 1)
    with pytest.raises(fstore.CorruptStoreError, match="is missing"):
        s.read("p5", 9)
    assert s.read("p2", 0).shape == (1, 8, 16, 16)  # undamaged shards still read


def test_verify_flags_nan_written_behind_the_ledger(tmp_path):
    path = build_store(tmp_path / "s.zarr", n=8, shard_size=4, dtype="fp32", codec="none")  # same size after the edit
    arr = fstore.open(path).array("features/p4")
    import zarr

    zarr.open_array(str(path / "features/p4"), mode="r+")[5, 0, 0, 0, 0] = np.nan
    kinds = {p.kind for p in fstore.verify(path).problems}
    assert "nonfinite" in kinds and arr.shape[0] == 8


def test_fingerprint_mismatch_names_the_field(tmp_path):
    path = build_store(tmp_path / "s.zarr", dtype="fp16")
    m, keys = make_manifest(dtype="int8")
    with pytest.raises(fstore.StoreError, match=r"storage\.dtype: \"fp16\" != \"int8\""):
        fstore.create(path, m, keys)
    m2, keys2 = make_manifest(input_size=128)
    with pytest.raises(fstore.StoreError, match=r"backbone\.input_size: 64 != 128"):
        fstore.create(path, m2, keys2)
    assert fstore.verify(path).ok  # nothing touched
    w = fstore.create(path, m, keys, overwrite=True)
    assert w.manifest.storage.dtype == "int8" and len(w.pending()) == 3


def test_refuses_to_replace_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    m, keys = make_manifest()
    for overwrite in (False, True):
        with pytest.raises(fstore.StoreError, match="not an fcache store"):
            fstore.create(tmp_path / "data", m, keys, overwrite=overwrite)
    assert (tmp_path / "data" / "precious.txt").exists()


def test_overwrite_refuses_a_store_holding_foreign_files(tmp_path):
    path = build_store(tmp_path / "s.zarr", dtype="fp16")
    (path / "notes.txt").write_text("my notes")
    m, keys = make_manifest(dtype="int8")
    with pytest.raises(fstore.StoreError, match=r"holds files fcache did not write \(notes\.txt\); move them out"):
        fstore.create(path, m, keys, overwrite=True)
    assert (path / "notes.txt").read_text() == "my notes" and fstore.verify(path).ok


def test_overwrite_refuses_a_symbolic_link(tmp_path):
    real = build_store(tmp_path / "real.zarr", dtype="fp16")
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    m, keys = make_manifest(dtype="int8")
    with pytest.raises(fstore.StoreError, match="is a symbolic link"):
        fstore.create(link, m, keys, overwrite=True)
    assert link.is_symlink() and fstore.verify(real).ok


@pytest.mark.parametrize("fs", ["tmpfs", "raising"])
def test_disk_full_is_clear_and_committed_units_survive(tmp_path, monkeypatch, fs):
    mnt = tmp_path / "small"
    mnt.mkdir()
    path = mnt / "s.zarr"
    if fs == "tmpfs":  # a real 1 MB file system, where this machine lets tests mount one
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here; the 'raising' variant covers ENOSPC")
    try:
        m, keys = make_manifest(n=16, shard_size=4, dtype="fp32", codec="none", input_size=192)  # ~2 MB of features
        w = fstore.create(path, m, keys)
        if fs == "raising":  # a file system that fills up after the first unit's files
            import zarr.storage._local as zlocal

            real_put, writes = zlocal._put, []

            def put(p, value, exclusive=False):
                if "features" in str(p) and len(writes) >= 8:
                    raise OSError(errno.ENOSPC, "No space left on device", str(p))
                writes.append(p)
                return real_put(p, value, exclusive)

            monkeypatch.setattr(zlocal, "_put", put)
        with pytest.raises(fstore.StoreError, match="disk full while writing unit") as e:
            write_all(w)
        assert "committed units are intact" in str(e.value)
        committed = set(fstore.open(path).ledger)
        assert committed and len(committed) < 4
        report = fstore.verify(path)
        assert {p.kind for p in report.problems} <= {"incomplete", "temporary"}
        monkeypatch.undo()
        if fs == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        write_all(fstore.StoreWriter(path))
        assert fstore.verify(path).ok
    finally:
        if fs == "tmpfs":
            subprocess.run(["umount", str(mnt)], check=False)


def test_fp16_overflow_stops_with_advice(tmp_path):
    m, keys = make_manifest(n=4, shard_size=4)
    w = fstore.create(tmp_path / "s.zarr", m, keys)
    feats, status, geometry, _ = unit_payload(m, w.units[0])
    feats["p4"][1, 0, 2, 0, 0] = 1e5
    with pytest.raises(fstore.Fp16OverflowError, match="--dtype bf16"):
        w.write_unit(w.units[0], feats, status, geometry)
    assert w.pending() == w.units  # nothing committed
    feats["p4"][1, 0, 2, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        w.write_unit(w.units[0], feats, status, geometry)


def test_bad_shapes_refused_before_anything_is_written(tmp_path):
    m, keys = make_manifest(n=4, shard_size=4)
    w = fstore.create(tmp_path / "s.zarr", m, keys)
    feats, status, geometry, _ = unit_payload(m, w.units[0])
    feats["p3"] = feats["p3"][:, :, :, :-1]
    with pytest.raises(ValueError, match="level p3 has shape"):
        w.write_unit(w.units[0], feats, status, geometry)
    assert not layout.shard_file(w.root, "features/p2", 0, 5).exists()


def test_int8_error_below_one_percent_on_real_backbone_features():
    timm = pytest.importorskip("timm")
    import torch
    from skimage import data

    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, features_only=True, img_size=128).eval()
    img = torch.from_numpy(data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float()[None] / 255
    with torch.inference_mode():
        feats = [f.permute(0, 3, 1, 2).numpy() for f in model((img - 0.45) / 0.225)]
    for x in feats:
        e = encode(x, "int8")
        assert e.rel_rmse < 0.01 and e.sq_err.shape == (1,)
        assert 0 < encode(x, "fp16").rel_rmse < 1e-3


def test_an_error_remade_from_a_worker_traceback_keeps_its_own_line():
    from fcache.common.errors import CorruptStoreError, InputError

    text = "shard 1 (samples 4-7) is corrupt; run fcache verify"
    worker = (
        "Caught CorruptStoreError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise CorruptStoreError(...)\n'
        f"fcache.common.errors.CorruptStoreError: {text}\n"
    )
    assert str(CorruptStoreError(worker)) == text
    assert str(InputError(text)) == text  # a plain message is kept as it is
