"""Where a store's bytes live: one interface (:class:`Backend`), two implementations (local disk, object storage).

Everything the store's code does to bytes goes through a backend, named by keys relative to the store's root
(``features/p3/c/2/0/0/0/0``, ``ledger/done/000002.json``): whole-object reads and writes, concurrent range reads,
and the four operations the commit protocol is built on:

- ``create(key, data)``: create an object only if it does not exist; the first writer wins (local: a hard link of a
  complete temporary file; S3: ``PUT If-None-Match: *``; GCS: ``ifGenerationMatch=0``). A lost reply to our own
  successful write looks like losing (the SDK retries and gets 412): ``create`` then re-reads the object and
  compares it with ``data``, so callers put a unique token in every record they create.
- ``read_version(key)``: the object's bytes with a version tag (ETag, generation, or inode + content hash locally)
  and its age since it was last written or renewed.
- ``swap(key, data, tag)`` / ``remove(key, tag)``: replace or delete the object only if it still has that tag
  (compare-and-swap), so a stale lease is taken over or released by exactly one party.

``new_store(build)`` creates a store so that it appears whole or not at all (local: built in a temporary folder and
renamed; object storage: the root ``zarr.json``, which holds the manifest, is created last and exclusively).
``list`` is for housekeeping (``info``, ``verify``, ``copy``, ``--overwrite``), never the truth of the protocol.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcache.common.errors import InputError

ROOT_META = "zarr.json"  # the root group's metadata: the store's manifest lives in its attributes
CLOUD_EXTRA = "pip install 'fcache[cloud]'"
SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}  # URL scheme -> the fsspec library that speaks it


@dataclass(frozen=True)
class Version:
    """An object as read for a conditional write: its bytes, an opaque version tag, its age in seconds."""

    data: bytes
    tag: str
    age: float


@dataclass(frozen=True)
class Range:
    """Bytes ``[start, stop)`` of an object; ``start < 0`` and ``stop is None``: the last ``-start`` bytes."""

    key: str
    start: int
    stop: int | None


class Backend(ABC):
    """A store's root on some storage. Picklable (location and options only); safe to use from many threads."""

    url: str  # the location as users write it (a path, or s3://bucket/prefix)
    root: Path | str  # a local store's folder, or the URL
    remote: bool  # object storage: no rename, no hard links, requests cost latency

    # -- zarr ---------------------------------------------------------------------------------------
    @abstractmethod
    def zarr_store(self, read_only: bool = True) -> Any:
        """A zarr v3 Store on the root (``zarr.storage.LocalStore`` / ``FsspecStore``)."""

    # -- whole objects ------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Several objects (concurrently where that pays); None for the missing ones."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def get_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        """Byte ranges of objects, all requests in flight at once on object storage. FileNotFoundError if one is missing."""

    def range_future(self, r: Range) -> Future[bytes]:
        """One range read started now, without waiting: its bytes (or its error, as ``get_ranges`` raises it) in a future.
        Object storage sends it at once, in flight beside the others started; here it is read before returning."""
        done: Future[bytes] = Future()
        try:
            done.set_result(self.get_ranges([r])[0])
        except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
            done.set_exception(e)
        return done

    @abstractmethod
    def sizes(self, keys: Sequence[str]) -> list[int | None]:
        """Sizes in bytes (None: missing), concurrently on object storage."""

    def size(self, key: str) -> int | None:
        return self.sizes([key])[0]

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write a whole object (replacing it); readers see the old bytes or the new, never a part."""

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        """Write several whole objects (concurrently where that pays), each as ``put`` does."""
        for key, data in objects.items():
            self.put(key, data)

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file as the object ``key`` (streamed; multipart on object storage), replacing it whole."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects; missing ones are fine."""

    @abstractmethod
    def listing(self, prefix: str = "") -> dict[str, int]:
        """Keys under ``prefix`` with their sizes. Housekeeping only: never the truth of the commit protocol."""

    # -- the commit protocol ------------------------------------------------------------------------
    @abstractmethod
    def create(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if it does not exist: its version tag when this call (or its own lost-reply retry)
        created it, None when another one did. An object already holding exactly ``data`` counts as ours: callers put
        a unique token in what they create."""

    @abstractmethod
    def read_version(self, key: str) -> Version | None:
        """The object with its version tag and age, or None when it does not exist."""

    @abstractmethod
    def swap(self, key: str, data: bytes, tag: str) -> str | None:
        """Replace the object if its tag is still ``tag``; the new tag, or None when it changed or vanished."""

    @abstractmethod
    def renew(self, key: str, data: bytes, tag: str) -> str | None:
        """Mark a lease as alive if its tag is still ``tag`` (locally its mtime, on object storage a ``swap`` to ``data``)."""

    @abstractmethod
    def remove(self, key: str, tag: str) -> bool:
        """Delete the object if its tag is still ``tag``; False when it changed or vanished."""

    # -- whole stores -------------------------------------------------------------------------------
    @abstractmethod
    def new_store(self, build: Callable[[Any], None]) -> None:
        """Create the store with ``build(zarr_store)`` so that it appears whole or not at all.

        Raises:
            FileExistsError: another process created a store here meanwhile.
        """

    @abstractmethod
    def clear(self, keep: Sequence[str] = ()) -> None:
        """Delete everything under the root (``--overwrite``): on object storage all but the keys in ``keep`` (the driver
        lease of a store rebuilt in place); a local store goes whole, as its new one appears by a rename."""

    @abstractmethod
    def is_empty(self) -> bool:
        """Nothing at all is stored under the root."""

    @abstractmethod
    def temporaries(self) -> list[str]:
        """Keys of temporary files left by interrupted writes (object storage writes are atomic: none)."""

    def delete_temporaries(self, keys: Sequence[str]) -> None:
        """Delete the temporary files an interrupted write of ``keys`` may have left (none on object storage)."""
        return None

    def where(self, key: str = "") -> str:
        """The full location of ``key``, for messages."""
        return f"{self.url}/{key}" if key else self.url

    @property
    @abstractmethod
    def location(self) -> tuple[str, ...]:
        """Where the root is, as path parts under a scheme: one is inside another when its parts start with the other's."""


def overlapping(a: Backend, b: Backend) -> bool:
    """Whether ``a`` and ``b`` are one location or one lies inside the other (an output must never land on its input)."""
    n = min(len(a.location), len(b.location))
    return a.location[:n] == b.location[:n]


def is_url(location: str) -> bool:
    """``scheme://...`` other than ``file://``."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def open_backend(location: Any, storage_options: Mapping[str, Any] | None = None) -> Backend:
    """The backend of a store location: a local path (or ``file://``), ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

    Raises:
        InputError: an unsupported scheme, or a cloud URL without the ``cloud`` extra installed.
    """
    if isinstance(location, Backend):
        return location
    text = str(location)
    if not is_url(text):
        from fcache.store.backends.local import LocalBackend

        if storage_options:
            raise InputError(f"--storage-options are for stores in object storage (s3://, gs://), not for the local path {text}")
        return LocalBackend(text.removeprefix("file://"))
    scheme = text.partition("://")[0]
    if scheme not in SCHEMES:
        raise InputError(
            f"{text}: fcache stores live on a local path, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX "
            f"({scheme}:// offers no conditional writes the commit protocol can rely on)"
        )
    from fcache.store.backends.objects import ObjectBackend

    return ObjectBackend(text, dict(storage_options or {}))


def parse_storage_options(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--storage-options JSON`` -> a dict passed to s3fs / gcsfs as they are (``{}`` when empty)."""
    if not text:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InputError(f'--storage-options is not valid JSON ({e}); give an object such as \'{{"profile": "lab"}}\'') from None
    if not isinstance(value, dict):
        raise InputError('--storage-options must be a JSON object such as \'{"endpoint_url": "http://..."}\'')
    return value


def parse_size(text: str | int) -> int:
    """``200GB`` / ``1.5TB`` / ``512MiB`` / ``1000`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not 0 <= value * units[unit] < 2**63:  # also nan and inf
        raise InputError(f"{text!r} is not a size; write e.g. 200GB, 1.5TB or 512MiB")
    return int(value * units[unit])
