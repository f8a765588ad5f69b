"""Read-ahead (``FeatureStore.read_stream``, ``fcache.store.readahead``) on a loopback S3 server: the values of
``read_many`` and of the local store, at most ``window`` range requests in flight (counted) and the window kept full,
one request for chunks back to back in one object (a shard read in order), the errors ``read_many`` raises at the
request that meets them, and no thread left behind when it fails or is closed.
(That it equals ``read_many`` for every stored form, locally, on S3 and on GCS: test_conformance's direct-read test.)"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from fcache import store as fstore
from fcache.store import layout, readahead
from fcache.store.backends import Range
from fcache.store.backends.objects import ObjectBackend
from helpers import build_store

KW = dict(n=12, shard_size=4, views=2, dtype="int8")  # scaled values: side data per unit


@pytest.fixture(scope="module")
def stores(s3_server, tmp_path_factory) -> tuple[str, fstore.FeatureStore]:
    """A small store in S3 and the same store on local disk."""
    local = build_store(tmp_path_factory.mktemp("ra") / "s.zarr", failed=(5,), **KW)
    return str(build_store(s3_server.bucket() + "/s.zarr", failed=(5,), **KW)), fstore.open(local)


class Counted:
    """``ObjectBackend.range_future`` wrapped: range requests in flight now, and the most at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = self.most = self.sent = 0
        self.lock = threading.Lock()
        original = ObjectBackend.range_future

        def counted(backend: ObjectBackend, r: Range) -> Future[bytes]:
            with self.lock:
                self.now, self.sent = self.now + 1, self.sent + 1
                self.most = max(self.most, self.now)
            f = original(backend, r)
            f.add_done_callback(self.done)  # before the read-ahead's own: counted down before its slot is freed
            return f

        monkeypatch.setattr(ObjectBackend, "range_future", counted)

    def done(self, _: Future[bytes]) -> None:
        with self.lock:
            self.now -= 1


def requests_of(s: fstore.FeatureStore) -> list[tuple[str, int, int | None]]:
    return [(lv, int(i), v) for i in s.ok_indices for lv in ("p2", "p5") for v in (1, None, 0)]


def no_feeder_left() -> bool:
    return not any(t.name == "fcache-readahead" for t in threading.enumerate())


def test_read_ahead_equals_read_many_and_keeps_its_window(stores, monkeypatch):
    url, local = stores
    for reader in ("obstore", "fsspec"):
        if reader == "obstore":
            pytest.importorskip("obstore")
        s = fstore.open(ObjectBackend(url, reader=reader))
        requests = requests_of(s)
        want = s.read_many(requests)
        count = Counted(monkeypatch)
        got = list(s.read_stream(requests, window=4))
        chunks = sum(2 if v is None else 1 for _, _, v in requests)
        assert count.sent < chunks and (count.most, count.now) == (4, 0)  # 4 at once at most and at best; a request
        # reads the views of a sample where they lie back to back (test_chunks_back_to_back_are_read_by_one_request)
        for (lv, i, v), a, b in zip(requests, want, got, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(b, local.read(lv, i, v))
        monkeypatch.undo()
    assert no_feeder_left()


def test_a_missing_object_raises_read_manys_error_where_the_stream_meets_it(stores, s3_bucket):
    url = build_store(s3_bucket + "/s.zarr", **KW)
    requests = [("p2", i, 0) for i in range(12)]
    s = fstore.open(url)
    s.backend.delete([layout.shard_key("features/p2", 2, 5)])  # samples 8-11
    with pytest.raises(fstore.CorruptStoreError) as many:
        fstore.open(url).read_many(requests)
    got = []
    with pytest.raises(fstore.CorruptStoreError) as ahead:
        for values in s.read_stream(requests, window=4):
            got.append(values)
    assert str(ahead.value) == str(many.value) and "is missing" in str(many.value)
    assert len(got) == 8  # the samples before the missing shard were handed over
    assert no_feeder_left()


def test_a_failing_request_raises_its_error_and_leaves_nothing_running(stores, monkeypatch):
    url, _ = stores
    s = fstore.open(ObjectBackend(url, reader="fsspec"))
    requests = [("p2", i, 0) for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11)]
    bad = layout.shard_key("features/p2", 1, 5)
    original = ObjectBackend._range

    async def failing(backend, fs, r: Range) -> bytes:
        if r.key == bad:
            raise OSError("the request failed")
        return await original(backend, fs, r)

    s.read_many(requests[:1])  # every shard's index read first, so that only the chunk requests fail
    s.read_many(requests[4:5])
    monkeypatch.setattr(ObjectBackend, "_range", failing)
    with pytest.raises(OSError, match="^the request failed$"):
        s.read_many(requests)
    count = Counted(monkeypatch)
    got = []
    with pytest.raises(OSError, match="^the request failed$"):
        for values in s.read_stream(requests, window=3):
            got.append(values)
    assert len(got) == 4 and count.now == 0 and no_feeder_left()


def test_closing_the_stream_early_stops_it(stores, monkeypatch):
    url, _ = stores
    s = fstore.open(url)
    count = Counted(monkeypatch)
    stream = s.read_stream(requests_of(s), window=4)
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert len(first) == 3 and count.now == 0 and count.sent <= 3 + 2 * 4 + 1  # held ahead: 2 windows of chunks at most
    assert no_feeder_left()


def test_expected_requests_are_taken_while_they_match_then_read_as_usual(stores, s3_bucket):
    url, local = stores
    s = fstore.open(url)
    picked = [(int(i), 1) for i in local.ok_indices]
    told = [(lv, i, v) for i, v in picked for lv in ("p2", "p5")]
    s.expect(told[:8] + [("p2", 0, 0)] + told[8:], window=3)  # a wrong guess after the first four samples
    for first, part in ((True, picked[:4]), (False, picked[4:])):
        got, want = s.read_stored(["p2", "p5"], part), local.read_stored(["p2", "p5"], part)
        for lv in ("p2", "p5"):
            assert torch.equal(got[lv].values, want[lv].values) and torch.equal(got[lv].side, want[lv].side)
        assert s.expecting == first  # the guess that did not match ended it
    assert no_feeder_left()
    broken = build_store(s3_bucket + "/s.zarr", **KW)
    b = fstore.open(broken)
    b.backend.delete([layout.shard_key("features/p2", 1, 5)])
    b.expect([("p2", i, 0) for i in range(12)], window=3)
    assert b.read_stored(["p2"], [(0, 0), (1, 0)])["p2"].values.shape[0] == 2
    with pytest.raises(fstore.CorruptStoreError) as ahead:
        b.read_stored(["p2"], [(4, 0)])
    with pytest.raises(fstore.CorruptStoreError) as many:
        fstore.open(broken).read_many([("p2", 4, 0)])
    assert str(ahead.value) == str(many.value)  # raised by the store's own check, as read_many raises it
    b.expect(None)
    assert not b.expecting and no_feeder_left()


def test_large_chunks_get_a_smaller_window(stores, monkeypatch):
    url, local = stores
    s = fstore.open(url)
    chunk = max(int(np.prod(s.manifest.level_shape(lv))) for lv in s.level_names)  # int8: one byte per value
    monkeypatch.setattr(readahead, "HELD_BYTES", 3 * chunk)  # three of the largest chunks
    count = Counted(monkeypatch)
    requests = requests_of(s)
    for (lv, i, v), got in zip(requests, s.read_stream(requests, window=8), strict=True):
        np.testing.assert_array_equal(got, local.read(lv, i, v))
    assert count.most == 3 and count.now == 0


@pytest.fixture(scope="module")
def one_view(s3_server, tmp_path_factory) -> tuple[str, fstore.FeatureStore]:
    """12 samples of one view in shards of 4 (uncompressed), in S3 and on local disk: a shard's chunks lie back to back in
    index order."""
    kw = dict(n=12, shard_size=4, views=1, dtype="fp16", codec="none")  # chunks of one size
    local = build_store(tmp_path_factory.mktemp("rv") / "s.zarr", **kw)
    return str(build_store(s3_server.bucket() + "/one-view.zarr", **kw)), fstore.open(local)


def test_chunks_back_to_back_are_read_by_one_request(one_view, monkeypatch):
    url, local = one_view
    s = fstore.open(url)
    in_order = [("p2", i, 0) for i in range(12)]
    s.read_many(in_order[::4])  # the shard indexes, read before counting
    chunk = s.fetcher.range_of(s.fetcher.chunks_of(in_order[0])[0])
    cases = [
        (in_order, 4, None, 3),  # a block of 4 requests is one shard: one request each
        (in_order, 4, 2 * (chunk.stop - chunk.start), 6),  # runs cut at RUN_BYTES (chunks of one size here)
        (in_order, 3, None, 6),  # blocks of 3 across shards of 4: a run ends with its block and with its shard
        ([("p2", i, 0) for i in (3, 7, 11, 2, 6, 10, 1, 5, 9, 0, 4, 8)], 4, None, 12),  # never back to back
        ([r for i in range(12) for r in (("p2", i, 0), ("p5", i, 0))], 8, None, 6),  # two objects at once: a run each
    ]
    for requests, window, run_bytes, sent in cases:
        if run_bytes is not None:
            monkeypatch.setattr(readahead, "RUN_BYTES", run_bytes)
        count = Counted(monkeypatch)
        for (lv, i, v), got in zip(requests, s.read_stream(requests, window=window), strict=True):
            np.testing.assert_array_equal(got, local.read(lv, i, v))
        assert (count.sent, count.now) == (sent, 0), (requests[:3], window)
        monkeypatch.undo()
    assert no_feeder_left()


def test_requests_before_an_error_get_their_values_from_a_run_not_sent_yet(one_view, monkeypatch):
    url, local = one_view
    s = fstore.open(url)
    in_order = [("p2", i, 0) for i in range(12)]
    original = type(s.fetcher).range_of

    def absent_at_6(fetcher, w):
        if w == s.fetcher.chunks_of(("p2", 6, 0))[0]:
            raise fstore.CorruptStoreError("chunk 2 is absent from its shard")
        return original(fetcher, w)

    monkeypatch.setattr(type(s.fetcher), "range_of", absent_at_6)
    got = []
    with pytest.raises(fstore.CorruptStoreError, match="absent"):
        for values in s.read_stream(in_order, window=4):  # 4 and 5 wait in a run when 6 fails
            got.append(values)
    assert len(got) == 6
    for (lv, i, v), values in zip(in_order[:6], got, strict=True):
        np.testing.assert_array_equal(values, local.read(lv, i, v))
    assert no_feeder_left()


def test_a_request_for_every_view_fits_however_large_the_chunks(stores, monkeypatch):
    """Held ahead: at most ``HELD_BYTES`` of chunks, but always every view of one sample (a request's chunks together)."""
    url, local = stores
    s = fstore.open(url)
    chunk = max(int(np.prod(s.manifest.level_shape(lv))) for lv in s.level_names)
    monkeypatch.setattr(readahead, "HELD_BYTES", chunk)  # one chunk; a request for both views needs two
    requests = [("p2", int(i), None) for i in local.ok_indices]
    stream = s.read_stream(requests, window=4)
    got = []
    reader = threading.Thread(target=lambda: got.extend(stream), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the read-ahead waits for room it can never have"
    for (lv, i, v), values in zip(requests, got, strict=True):
        np.testing.assert_array_equal(values, local.read(lv, i, v))


def test_runs_are_not_cut_when_the_consumer_is_slower(one_view, monkeypatch):
    """With room for one block's chunks only and a consumer slower than the requests, each block still goes in one
    request per shard: the slots of a block's chunks are taken before its runs are formed."""
    url, local = one_view
    s = fstore.open(url)
    in_order = [("p2", i, 0) for i in range(12)]
    s.read_many(in_order[::4])
    chunk = max(int(np.prod(s.manifest.level_shape(lv))) for lv in s.level_names) * 2  # the largest chunk, fp16
    monkeypatch.setattr(readahead, "HELD_BYTES", 4 * chunk)
    count = Counted(monkeypatch)
    for (lv, i, v), got in zip(in_order, s.read_stream(in_order, window=4), strict=True):
        time.sleep(0.02)
        np.testing.assert_array_equal(got, local.read(lv, i, v))
    assert (count.sent, count.now) == (3, 0)
