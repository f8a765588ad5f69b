"""The store's protocol on a loopback S3 server (the storage interface itself: test_backends.py, the shipped suite).

Two writers on one unit commit exactly once, a damaged or deleted object is named by `verify` and refused by the
reader, the retry trap (a lost reply to our own conditional write) is not mistaken for losing, the disk cache is
bounded and never serves a damaged entry, and a DataLoader over an S3 store yields what the same store on disk does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.common.errors import InputError
from fcache.store import layout
from fcache.store.backends import open_backend, parse_size, parse_storage_options
from fcache.store.backends.objects import ObjectBackend
from helpers import build_store, decoded, refused

SCRIPT = Path(__file__).with_name("writer_proc.py")


def test_lost_reply_to_our_own_create_is_not_losing(s3_bucket, monkeypatch):
    """The SDK retries a create whose reply was lost and gets 412 for our own object: create re-reads and compares."""
    b = open_backend(s3_bucket + "/t.zarr")
    real = type(b.ops).create

    async def reply_lost(self, backend, key, data):
        await real(self, backend, key, data)  # the write lands...
        return None  # ...but what comes back is the retry's 412

    monkeypatch.setattr(type(b.ops), "create", reply_lost)
    assert b.create("ledger/done/000000.json", b"record with token 1") is not None
    assert b.create("ledger/done/000000.json", b"record with token 2") is None  # another writer's record: lost


@pytest.mark.slow
def test_two_processes_same_unit_exactly_one_commit_on_s3(s3_bucket):
    url = s3_bucket + "/s.zarr"
    run = lambda *a: subprocess.Popen([sys.executable, str(SCRIPT), url, *a], stdout=subprocess.PIPE, text=True)  # noqa: E731
    assert run("--units", "").wait(timeout=120) == 0  # the whole store, then every commit forgotten
    b = open_backend(url)
    b.delete([k for k in b.listing("ledger/done")])
    procs = [run("--units", "0", "--slow", "0.3") for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[1] for o in outs) == ["committed", "skipped"]
    assert list(b.listing("ledger/done")) == ["ledger/done/000000.json"]
    assert fstore.verify(url).problems == [] or {p.kind for p in fstore.verify(url).problems} == {"incomplete"}


def test_damaged_and_deleted_objects_are_named_and_refused(s3_bucket):
    url = s3_bucket + "/s.zarr"
    build_store(url, n=12, shard_size=4)
    b = open_backend(url)
    flipped, deleted = layout.shard_key("features/p2", 1, 5), layout.shard_key("features/p5", 2, 5)
    data = bytearray(b.get(flipped))
    data[40] ^= 0xFF  # inside the first chunk of shard 1 (sample 4): same size, other bytes
    b.put(flipped, bytes(data))
    b.delete([deleted])

    r = CliRunner().invoke(main, ["verify", url])
    assert r.exit_code == 1
    named = {(p.path, p.samples, p.kind) for p in fstore.verify(url).problems}
    assert named == {(flipped, (4, 7), "checksum"), (flipped, (4, 7), "decode"), (deleted, (8, 11), "missing")}
    assert flipped in r.output and deleted in r.output
    s = fstore.open(url)
    with pytest.raises(fstore.CorruptStoreError, match="shard 1 \\(samples 4-7\\) is corrupt"):
        s.read("p2", 4)
    with pytest.raises(fstore.CorruptStoreError, match="is missing"):
        s.read("p5", 9)
    assert s.read("p2", 0).shape == (1, 8, 16, 16)  # undamaged shards still read


def test_remote_reads_equal_local_reads_with_and_without_cache(tmp_path, s3_bucket):
    kw = dict(n=10, shard_size=4, views=2, dtype="int8", failed=(3,))
    local, url = build_store(tmp_path / "s.zarr", **kw), build_store(s3_bucket + "/s.zarr", **kw)
    ref = fstore.open(local)
    for cache in (None, tmp_path / "cache"):
        s = fstore.open(url, cache_dir=cache, cache_size="1GB")
        requests = [(lv, int(i), v) for i in ref.ok_indices for lv in ("p2", "p5") for v in (0, 1, None)]
        for (lv, i, v), got in zip(requests, s.read_many(requests), strict=True):
            np.testing.assert_array_equal(got, ref.read(lv, i, v))
    loader = lambda s: torch.utils.data.DataLoader(s.dataset(["p3"], view="random", views=(0, 1)), batch_size=4, num_workers=2)  # noqa: E731
    got = torch.cat([b["features"]["p3"] for b in loader(fstore.open(url, cache_dir=tmp_path / "cache"))])
    want = torch.cat([b["features"]["p3"] for b in loader(ref)])
    assert torch.equal(got, want)


def test_disk_cache_is_bounded_lru_and_drops_damaged_entries(tmp_path, s3_bucket):
    url = build_store(s3_bucket + "/s.zarr", n=16, shard_size=2, dtype="fp32", codec="none")
    cache = tmp_path / "cache"
    s = fstore.open(url, cache_dir=cache, cache_size="60KB")  # a p2 shard of 2 samples is 16 KB: 8 of them do not fit
    ref = {i: s.read("p2", i) for i in range(16)}
    folders = list(next(cache.iterdir()).iterdir())
    assert 2 <= len(folders) < 8 and {f.name.split("-")[1] for f in folders} >= {"000007"}  # the last shard read is kept
    assert 0 < s.fetcher.cache.size() <= parse_size("63KB")
    fresh = fstore.open(url, cache_dir=cache, cache_size="60KB")
    folder = max((p for p in next(cache.iterdir()).iterdir()), key=lambda p: p.stat().st_mtime)  # a shard still cached
    entry = next(p for p in folder.iterdir() if p.name.startswith("c"))
    entry.write_bytes(b"\0" * entry.stat().st_size)  # damage the cache, never the store
    level, unit = folder.name.split("-")[:2]
    i = int(unit) * 2 + int(entry.name[1:])
    np.testing.assert_array_equal(fresh.read(level, i, 0), ref[i][0] if level == "p2" else fresh.read(level, i, 0))
    assert entry.read_bytes() != b"\0" * entry.stat().st_size  # the damaged entry was replaced from the store
    assert fstore.verify(url).ok


def test_urls_need_the_cloud_extra_and_a_known_scheme(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_s3fs(name, *a, **kw):
        if name == "s3fs":
            raise ImportError("No module named 's3fs'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_s3fs)
    with pytest.raises(InputError, match=r"pip install 'fcache\[cloud\]'"):
        ObjectBackend("s3://bucket/x.zarr")
    refused(CliRunner().invoke(main, ["info", "s3://bucket/x.zarr"]), "fcache[cloud]")
    monkeypatch.undo()
    refused(CliRunner().invoke(main, ["info", "ftp://host/x.zarr"]), "ftp:// offers no conditional writes")
    refused(CliRunner().invoke(main, ["info", "s3://bucket/x.zarr", "--storage-options", "{bad"]), "--storage-options is not valid JSON")
    assert parse_storage_options('{"s3": {"profile": "a"}, "gs": {"project": "p"}}')["gs"] == {"project": "p"}
    assert ObjectBackend("s3://bucket/x", {"s3": {"anon": True}, "gs": {"token": "t"}}).options == {"anon": True}


def test_info_and_verify_take_urls(s3_bucket):
    url = build_store(s3_bucket + "/s.zarr", n=6, shard_size=4)
    r = CliRunner().invoke(main, ["info", url])
    assert r.exit_code == 0 and "2/2 committed" in r.output and url in r.output
    assert CliRunner().invoke(main, ["verify", url]).exit_code == 0
    refused(CliRunner().invoke(main, ["info", s3_bucket + "/nothing.zarr"]), "is not an fcache store")


def test_a_store_is_invisible_until_its_manifest_is_written(s3_bucket, monkeypatch):
    from fcache.store.backends import objects

    url = s3_bucket + "/s.zarr"
    real = objects.ObjectBackend.create

    def crash_before_manifest(self, key, data):
        if key == "zarr.json":
            raise KeyboardInterrupt  # killed after the arrays were written, before the manifest
        return real(self, key, data)

    monkeypatch.setattr(objects.ObjectBackend, "create", crash_before_manifest)
    with pytest.raises(KeyboardInterrupt):
        build_store(url, n=6, shard_size=4)
    monkeypatch.undo()
    assert open_backend(url).listing() and not open_backend(url).exists("zarr.json")
    with pytest.raises(fstore.StoreError, match="not an fcache store"):
        fstore.open(url)
    build_store(url, n=6, shard_size=4)  # the leftovers of the interrupted creation are cleared and the store built
    assert fstore.verify(url).ok
    assert decoded(url)["p2"].shape == (6, 1, 8, 16, 16)
    _ = time
