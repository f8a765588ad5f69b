"""A local disk cache of a remote store's shards, capped in size, least recently used shards evicted first.

``DIR/<store>/<shard>/`` holds what was read of one shard object: its index (``index``) and chunks (``c<k>``), each
written through a temporary file and renamed, so a reader never sees half an entry. ``<shard>`` names the level, the
unit and the sha256 the ledger recorded for that shard, so a re-extracted shard never meets a stale entry. A shard's
folder mtime is its last use; when the cache grows past its cap, whole shards go, oldest first, until it holds 90%
of the cap (it may pass the cap by 5% per process in between). Many processes (DataLoader workers, several runs)
may share one cache: each counts what it adds and rescans the folder before evicting. Entries are checked by the
chunk's CRC32C when decoded; a bad one is dropped and read again from the store. The cache never writes to the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path

DEFAULT_CAPACITY = 50 * 10**9
LOW_WATER = 0.9  # eviction goes down to this fraction of the cap


class DiskCache:
    """Entries ``(shard, name) -> bytes`` under ``root/<store>``; ``capacity`` bytes at most (approximately, across processes)."""

    def __init__(self, root: str | Path, capacity: int, store_url: str) -> None:
        self.capacity = capacity or DEFAULT_CAPACITY
        self.base = Path(root) / hashlib.sha256(store_url.encode()).hexdigest()[:16]
        self.base.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._added = 0
        self._used: set[str] = set()
        self._evict()

    def get(self, shard: str, name: str) -> bytes | None:
        path = self.base / shard / name
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        self._touch(shard)
        return data

    def put(self, shard: str, name: str, data: bytes) -> None:
        folder = self.base / shard
        try:
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}-{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)
        except FileNotFoundError:
            return  # evicted by another process meanwhile: the next read fetches it again
        except OSError:
            return  # a full or read-only cache disk never fails a read
        self._touch(shard)
        with self._lock:
            self._added += len(data)
            due = self._added > (1 - LOW_WATER) * self.capacity / 2
        if due:
            self._evict()

    def drop(self, shard: str, name: str) -> None:
        (self.base / shard / name).unlink(missing_ok=True)

    def size(self) -> int:
        return sum(size for _, size, _ in self._scan())

    def _touch(self, shard: str) -> None:
        if shard in self._used:  # once per shard and second is enough for an LRU of shards
            return
        self._used.add(shard)
        with contextlib.suppress(OSError):
            os.utime(self.base / shard)
        if len(self._used) > 4096:
            self._used.clear()

    def _scan(self) -> list[tuple[float, int, Path]]:
        out = []
        for folder in self.base.iterdir():
            try:
                size = sum(f.stat().st_size for f in folder.iterdir())
                out.append((folder.stat().st_mtime, size, folder))
            except OSError:
                continue  # evicted by another process while scanned
        return out

    def _evict(self) -> None:
        """Remove least recently used shards until the cache holds at most LOW_WATER of its cap."""
        with self._lock:
            self._added = 0
            self._used.clear()
            entries = sorted(self._scan())
            total = sum(size for _, size, _ in entries)
            if total <= self.capacity:
                return
            for _, size, folder in entries:
                if total <= LOW_WATER * self.capacity:
                    break
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
