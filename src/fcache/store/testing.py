"""The conformance suite of storage backends (``fcache.store.backends.Backend``), shipped so that any backend is tested
by subclassing it, as zarr ships ``zarr.testing.store.StoreTests`` (needs pytest)::

    class TestMyBackend(BackendTests):
        @pytest.fixture
        def backend(self, tmp_path) -> Backend: ...      # an empty store location on the storage under test
        def raw_put(self, backend, key, data): ...       # write an object without the backend
        def raw_get(self, backend, key): ...             # read one (None when missing) without the backend

The raw helpers must not use the backend's methods: bypassing them is what lets the suite test them (a ``get`` is
checked against bytes written raw, a ``put`` or ``create`` by reading raw what it wrote). ``compare_and_swap = False``
skips, saying so, the tests of conditional replace and delete (``swap``, ``renew``, ``remove``, leases) for storage
that cannot honour them (an emulator that ignores the preconditions).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from fcache.store import layout
from fcache.store.backends import Backend, Range, open_backend
from fcache.store.leases import Lease

TEN = b"0123456789"


class BackendTests(ABC):
    """What every backend must do; a subclass provides the ``backend`` fixture and the raw helpers."""

    compare_and_swap: bool = True

    @abstractmethod
    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        """Write object ``key`` of ``backend``'s store. This should not use any backend methods: bypassing them allows
        them to be tested."""

    @abstractmethod
    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        """Object ``key`` of ``backend``'s store, None when missing. This should not use any backend methods."""

    def needs_compare_and_swap(self) -> None:
        if not self.compare_and_swap:
            pytest.skip(f"{type(self).__name__}: this storage does not honour conditional replace and delete")

    # -- whole objects ----------------------------------------------------------------------------------------------
    def test_get_sizes_and_ranges_read_what_is_there(self, backend: Backend) -> None:
        self.raw_put(backend, "x/y", TEN)
        assert backend.get("x/y") == TEN and backend.get("nope") is None and backend.get_many(["x/y", "nope"]) == [TEN, None]
        assert backend.sizes(["x/y", "nope"]) == [10, None] and backend.size("x/y") == 10
        assert backend.exists("x/y") and not backend.exists("x") and not backend.exists("nope")
        assert backend.get_ranges([Range("x/y", 2, 5), Range("x/y", -3, None), Range("x/y", 7, None)]) == [b"234", b"789", b"789"]
        with pytest.raises(FileNotFoundError):
            backend.get_ranges([Range("nope", 0, 1)])

    def test_range_futures_read_what_get_ranges_reads(self, backend: Backend) -> None:
        self.raw_put(backend, "x/y", TEN)
        ranges = [Range("x/y", 2, 5), Range("x/y", -3, None), Range("x/y", 7, None), Range("nope", 0, 1)]
        futures = [backend.range_future(r) for r in ranges]  # all started before any is waited on
        assert [f.result(timeout=60) for f in futures[:3]] == backend.get_ranges(ranges[:3]) == [b"234", b"789", b"789"]
        with pytest.raises(FileNotFoundError):
            futures[3].result(timeout=60)

    def test_put_replaces_objects_whole(self, backend: Backend, tmp_path: Path) -> None:
        backend.put("x/y", TEN)
        assert self.raw_get(backend, "x/y") == TEN
        backend.put("x/y", b"abc")
        assert self.raw_get(backend, "x/y") == b"abc"
        (tmp_path / "upload").write_bytes(TEN * 3)
        backend.put_file("x/file", tmp_path / "upload")
        assert self.raw_get(backend, "x/file") == TEN * 3
        backend.put_many({"x/y": TEN, "m/0": b"0", "m/1": b""})
        assert [self.raw_get(backend, k) for k in ("x/y", "m/0", "m/1")] == [TEN, b"0", b""] and backend.temporaries() == []

    def test_delete_and_listing(self, backend: Backend) -> None:
        for key, data in {"a": b"1", "x/y": TEN, "x/z/w": b"333"}.items():
            self.raw_put(backend, key, data)
        assert backend.listing() == {"a": 1, "x/y": 10, "x/z/w": 3} and backend.listing("x/z") == {"x/z/w": 3}
        assert backend.listing("nope") == {}
        backend.delete(["x/y", "nope"])  # a missing key is fine
        assert self.raw_get(backend, "x/y") is None and self.raw_get(backend, "a") == b"1"
        assert backend.listing() == {"a": 1, "x/z/w": 3}

    def test_clear_and_is_empty(self, backend: Backend) -> None:
        assert backend.is_empty()
        for key in ("a", "x/y", "ledger/driver.lease"):
            self.raw_put(backend, key, TEN)
        assert not backend.is_empty() and backend.temporaries() == []
        backend.clear(keep=("ledger/driver.lease",))  # kept in place on object storage; a local store goes whole
        assert self.raw_get(backend, "a") is None and self.raw_get(backend, "x/y") is None
        backend.clear()
        assert backend.is_empty() and self.raw_get(backend, "ledger/driver.lease") is None

    def test_pickled_backend_reads_the_same_store(self, backend: Backend) -> None:
        self.raw_put(backend, "x/y", TEN)
        other = pickle.loads(pickle.dumps(backend))
        assert other.url == backend.url and other.get("x/y") == TEN

    # -- the commit protocol ----------------------------------------------------------------------------------------
    def test_create_is_exclusive_and_survives_its_own_retry(self, backend: Backend) -> None:
        tag = backend.create("ledger/done/000001.json", b"mine")
        assert tag is not None and self.raw_get(backend, "ledger/done/000001.json") == b"mine"
        assert backend.create("ledger/done/000001.json", b"theirs") is None  # the first writer won
        assert backend.create("ledger/done/000001.json", b"mine") == tag  # our own write, answered 412 on a retry
        assert self.raw_get(backend, "ledger/done/000001.json") == b"mine"
        self.raw_put(backend, "ledger/done/000002.json", b"written by another")
        assert backend.create("ledger/done/000002.json", b"mine") is None
        assert self.raw_get(backend, "ledger/done/000002.json") == b"written by another"

    def test_read_version_gives_bytes_a_tag_and_an_age(self, backend: Backend) -> None:
        self.raw_put(backend, "lease", b"a")
        current = backend.read_version("lease")
        assert current is not None and current.data == b"a" and current.tag and 0 <= current.age < 60
        assert backend.read_version("nope") is None

    def test_compare_and_swap_and_remove(self, backend: Backend) -> None:
        self.needs_compare_and_swap()
        tag = backend.create("lease", b"a")
        current = backend.read_version("lease")
        assert tag is not None and current is not None and current.data == b"a" and current.tag == tag
        new = backend.swap("lease", b"b", tag)
        assert new is not None and self.raw_get(backend, "lease") == b"b"
        assert backend.swap("lease", b"c", tag) is None and self.raw_get(backend, "lease") == b"b"  # a stale tag changes nothing
        assert not backend.remove("lease", tag) and self.raw_get(backend, "lease") == b"b"
        assert backend.remove("lease", new) and self.raw_get(backend, "lease") is None
        assert backend.read_version("lease") is None and backend.swap("lease", b"d", new) is None
        mine = backend.create("other", b"a")
        self.raw_put(backend, "other", b"z")  # replaced behind our back: our tag is stale
        assert mine is not None and backend.swap("other", b"b", mine) is None and not backend.remove("other", mine)
        assert self.raw_get(backend, "other") == b"z"

    def test_renew_keeps_only_a_current_lease_alive(self, backend: Backend) -> None:
        self.needs_compare_and_swap()
        tag = backend.create("lease", b"a")
        assert tag is not None
        renewed = backend.renew("lease", b"a", tag)
        current = backend.read_version("lease")
        assert renewed is not None and current is not None and current.tag == renewed and current.data == b"a"
        self.raw_put(backend, "lease", b"theirs")
        assert backend.renew("lease", b"a", renewed) is None and self.raw_get(backend, "lease") == b"theirs"

    def test_a_new_store_appears_whole_or_not_at_all(self, backend: Backend) -> None:
        seen = []

        def build(store: Any) -> None:
            g = zarr.open_group(store, mode="a", zarr_format=3)
            g.create_array("a", shape=(4,), chunks=(2,), dtype="f4")[:] = np.arange(4)
            seen.append(open_backend(backend.url).exists("zarr.json"))
            g.attrs["fcache"] = {"x": 1}

        backend.new_store(build)
        assert seen == [False] and layout.read_manifest_attrs(backend) == {"x": 1}
        assert np.asarray(zarr.open_array(backend.zarr_store(), path="a", mode="r")[:]).tolist() == [0, 1, 2, 3]

    def test_leases_take_over_only_stale_holders(self, backend: Backend) -> None:
        self.needs_compare_and_swap()
        a = Lease(backend, "ledger/lock/000000.lock", timeout=3600)
        b = Lease(backend, "ledger/lock/000000.lock", timeout=3600)
        assert a.acquire() is None
        held = b.acquire()
        assert held is not None and held["token"] == a.token  # held, and the holder is named
        assert a.renew() and a.held()
        a.release()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
        b.info["pid"] = int(dead)  # b's process has died: its lease is stale for anyone on this host
        assert b.acquire() is None and b.held()
        c = Lease(backend, "ledger/lock/000000.lock", timeout=3600)
        assert c.acquire() is None and c.held() and not b.held()
        assert not b.renew()  # b lost it; its release leaves c's lease alone
        b.release()
        assert c.held()
