"""Two zarr Store wrappers the protocol needs: one holds back a key until the store is complete, one records writes.

``HoldBack`` keeps the root ``zarr.json`` (the manifest) in memory while a store is built on object storage, so the
store stays invisible until the backend creates that object last, exclusively. ``Recording`` notes the size and
sha256 of every object zarr writes, so a unit's ledger record checksums the bytes as they were sent, without reading
them back.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore


class HoldBack(WrapperStore[Any]):
    """Writes of ``key`` stay in ``value`` (and are read back from there); everything else goes to the wrapped store."""

    def __init__(self, store: Any, key: str) -> None:
        super().__init__(store)
        self.key = key
        self.buffer: Buffer | None = None

    def _with_store(self, store: Any) -> HoldBack:
        return HoldBack(store, self.key)

    @property
    def value(self) -> bytes | None:
        return None if self.buffer is None else self.buffer.to_bytes()

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if key == self.key:
            return self.buffer  # whole-object reads only: metadata is never read by range
        return await self._store.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        return self.buffer is not None if key == self.key else await self._store.exists(key)

    async def set(self, key: str, value: Buffer) -> None:
        if key == self.key:
            self.buffer = value
        else:
            await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if key == self.key:
            if self.buffer is None:
                self.buffer = value
        else:
            await self._store.set_if_not_exists(key, value)


class Recording(WrapperStore[Any]):
    """Passes everything through; ``written`` maps each key set to (size, sha256) of the bytes sent."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.written: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def _with_store(self, store: Any) -> Recording:
        return Recording(store)

    async def set(self, key: str, value: Buffer) -> None:
        data = value.to_bytes()
        await self._store.set(key, value)
        with self._lock:
            self.written[key] = (len(data), hashlib.sha256(data).hexdigest())

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        with self._lock:
            self.written.pop(key, None)
