"""The object-storage backend: s3:// through s3fs, gs:// through gcsfs, with conditional writes for the protocol.

One asynchronous fsspec filesystem per process and set of options (fsspec's instance cache) serves zarr
(``zarr.storage.FsspecStore``) and this backend's own requests, which run on zarr's event loop so that they share its
connection pool. Defaults fitted to a store (the user's ``--storage-options`` win): no listing cache (a cached listing
makes ``exists`` lie in both directions), no HEAD before every GET (``max_concurrency=1``) and a pool of 64
connections, since object stores are fast only with many requests in flight. The sessions are closed when the
process exits. Credentials and endpoints are whatever s3fs / gcsfs take: environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``), profiles, or
the options. Range reads and sizes of s3:// stores go through obstore where it is installed (``obstore_reads``: a
quarter of s3fs's CPU per request, so small chunks read at the rate latency allows); everything else, the commit
protocol included, through s3fs (obstore has no conditional DELETE, and its replies do not carry the server's clock).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import email.utils
import logging
import os
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from fcache.common.errors import InputError, StoreError
from fcache.store.backends import CLOUD_EXTRA, ROOT_META, SCHEMES, Backend, Range, Version, obstore_reads
from fcache.store.backends.zarrstores import HoldBack

T = TypeVar("T")
CONCURRENCY = 64  # requests in flight at once for one batch of reads
S3_DEFAULTS: dict[str, Any] = {"max_concurrency": 1, "config_kwargs": {"max_pool_connections": CONCURRENCY}}
CONFLICT_RETRIES = 5  # S3 may answer 409 ConditionalRequestConflict to concurrent conditional writes: retry
READERS = ("auto", "obstore", "fsspec")  # who reads ranges and sizes: obstore where it can, or always one of the two


def filesystem_class(scheme: str) -> type:
    """s3fs.S3FileSystem or gcsfs.GCSFileSystem, imported when a URL needs it."""
    library = SCHEMES[scheme]
    try:
        module = __import__(library)
    except ImportError:
        raise InputError(f"{scheme}:// stores need {library}, which comes with fcache's cloud extra: {CLOUD_EXTRA}") from None
    return module.S3FileSystem if library == "s3fs" else module.GCSFileSystem


class ObjectBackend(Backend):
    remote = True

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, reader: str = "auto") -> None:
        scheme, _, rest = url.partition("://")
        self.scheme = scheme
        self.bucket, _, prefix = rest.strip("/").partition("/")
        if not self.bucket:
            raise InputError(f"{url}: give a bucket and a prefix, e.g. {scheme}://my-bucket/coco-l.zarr")
        self.prefix = prefix.strip("/")
        self.url = f"{scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.root = self.url
        options = dict(storage_options or {})
        if any(k in SCHEMES and isinstance(v, dict) for k, v in options.items()):  # {"s3": {...}, "gs": {...}}: per scheme
            options = dict(options.get(scheme, {}))
        self.options = options
        self._cls = filesystem_class(scheme)
        self._fs: Any = None
        self._pid = -1
        self.ops: _Conditional = _S3() if scheme == "s3" else _Gcs()
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
        self.reader = reader
        why = "asked for fsspec" if reader == "fsspec" else obstore_reads.unsupported(scheme, options)
        if reader == "obstore" and why:
            raise InputError(f"{self.url}: cannot read through obstore: {why}")
        self.reads = obstore_reads.ObstoreReads(self.bucket, options) if why is None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options, "reader": self.reader}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"], state.get("reader", "auto"))  # type: ignore[misc]

    @property
    def read_client(self) -> str:
        """Who reads ranges and sizes in this process: ``obstore``, or ``s3fs`` / ``gcsfs``."""
        return "obstore" if self.reads is not None and obstore_reads.usable() else SCHEMES[self.scheme]

    @property
    def fs(self) -> Any:
        """The asynchronous filesystem of this process (made again in a forked child: sessions do not survive a fork)."""
        if self._fs is None or self._pid != os.getpid():
            opts = {"asynchronous": True, "use_listings_cache": False}
            if self.scheme == "s3":
                opts |= S3_DEFAULTS
            else:
                os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC probe of the bucket type
                # gcsfs logs each failed request with its traceback; without a handler of the user's, Python would print
                # them on stderr before fcache's own line (a handler the user configures still receives them)
                logging.getLogger("gcsfs").addHandler(logging.NullHandler())
            opts |= self.options
            self._fs, self._pid = self._cls(**opts), os.getpid()  # its session opens on zarr's loop, at the first request
            _close_at_exit(self._fs)
        return self._fs

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """``_sync``, with a missing bucket or an unreachable endpoint as one line naming this store."""
        return _sync(self._named(coro))

    async def _named(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, with a missing bucket or an unreachable endpoint as one line naming this store."""
        try:
            return await coro
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e) or "specified bucket does not exist" in str(e).lower():
                raise StoreError(f"{self.url}: the bucket {self.bucket!r} does not exist; create it or check the URL") from None
            raise
        except Exception as e:
            if not _unreachable(e):
                raise
            where = "AWS_ENDPOINT_URL, --storage-options" if self.scheme == "s3" else "--storage-options, STORAGE_EMULATOR_HOST"
            detail = " ".join(str(e).split("\n\n")[0].split())  # obstore's messages go on with a debug dump
            raise StoreError(
                f"{self.url}: cannot reach the object store ({type(e).__name__}: {detail[:200]}); check the endpoint "
                f"({where}) and the network"
            ) from None

    @property
    def location(self) -> tuple[str, ...]:
        return (self.scheme, self.bucket, *[p for p in self.prefix.split("/") if p])

    def path(self, key: str = "") -> str:
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def object_key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key) if p)

    def zarr_store(self, read_only: bool = True) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore(self.fs, read_only=read_only, path=self.path())

    # -- whole objects ------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        fs = self.fs

        async def one(key: str) -> bytes | None:
            try:
                return bytes(await fs._cat_file(self.path(key)))
            except FileNotFoundError:
                return None

        return self._sync(_gather([one(k) for k in keys]))

    def get_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        fs = self.fs
        if self.read_client == "obstore":
            assert self.reads is not None
            return self._sync(self.reads.get_ranges(fs, [self.object_key(r.key) for r in ranges], ranges))
        return self._sync(_gather([self._range(fs, r) for r in ranges]))

    def range_future(self, r: Range) -> Future[bytes]:
        """The range read sent now on zarr's event loop, in flight beside every other one started."""
        fs = self.fs
        if self.read_client == "obstore":
            assert self.reads is not None
            coro = self.reads.get_range(fs, self.object_key(r.key), r)
        else:
            coro = self._range(fs, r)
        from zarr.core.sync import _get_loop

        return asyncio.run_coroutine_threadsafe(self._named(coro), _get_loop())

    async def _range(self, fs: Any, r: Range) -> bytes:
        return bytes(await fs._cat_file(self.path(r.key), start=r.start, end=r.stop))

    def sizes(self, keys: Sequence[str]) -> list[int | None]:
        if self.read_client == "obstore":
            assert self.reads is not None
            return self._sync(_gather([self.reads.size(self.fs, self.object_key(k)) for k in keys]))
        return self._sync(_gather([self.ops.size(self, k) for k in keys]))

    def put(self, key: str, data: bytes) -> None:
        self._sync(self.fs._pipe_file(self.path(key), data))

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        self._sync(_gather([self.fs._pipe_file(self.path(k), data) for k, data in objects.items()]))

    def put_file(self, key: str, path: str | Path) -> None:
        self._sync(self.fs._put_file(str(path), self.path(key)))

    def delete(self, keys: Iterable[str]) -> None:
        fs = self.fs

        async def one(key: str) -> None:
            with contextlib.suppress(FileNotFoundError):
                await fs._rm_file(self.path(key))

        self._sync(_gather([one(k) for k in keys]))

    def listing(self, prefix: str = "") -> dict[str, int]:
        base = self.path()
        try:
            found = self._sync(self.fs._find(self.path(prefix), detail=True))
        except FileNotFoundError:
            return {}
        return {name[len(base) + 1 :]: int(info.get("size", 0)) for name, info in found.items() if info.get("type") != "directory"}

    # -- the commit protocol ------------------------------------------------------------------------
    def create(self, key: str, data: bytes) -> str | None:
        tag = self._sync(self.ops.create(self, key, data))
        if tag is not None:
            return tag
        current = self.read_version(key)  # a lost reply to our own write, retried by the SDK, also ends in 412
        return current.tag if current is not None and current.data == data else None

    def read_version(self, key: str) -> Version | None:
        return self._sync(self.ops.read_version(self, key))

    def swap(self, key: str, data: bytes, tag: str) -> str | None:
        new = self._sync(self.ops.swap(self, key, data, tag))
        if new is None:
            current = self.read_version(key)  # the same trap as ``create``: was it our own write that matched?
            return current.tag if current is not None and current.data == data else None
        return new

    def renew(self, key: str, data: bytes, tag: str) -> str | None:
        return self.swap(key, data, tag)

    def remove(self, key: str, tag: str) -> bool:
        return self._sync(self.ops.remove(self, key, tag))

    # -- whole stores -------------------------------------------------------------------------------
    def new_store(self, build: Callable[[Any], None]) -> None:
        held = HoldBack(self.zarr_store(read_only=False), ROOT_META)
        build(held)
        if held.value is None:
            raise RuntimeError("the store was built without its root metadata")
        if not self.create(ROOT_META, held.value):  # the manifest appears last, and only once
            raise FileExistsError(self.where(ROOT_META))

    def clear(self, keep: Sequence[str] = ()) -> None:
        keys = [k for k in self.listing() if k not in keep]
        self.delete(sorted(keys, key=lambda k: k == ROOT_META))  # the manifest goes last: a half-deleted store is not one

    def is_empty(self) -> bool:
        try:
            return not self._sync(self.fs._ls(self.path(), detail=False))
        except FileNotFoundError:
            return True

    def temporaries(self) -> list[str]:
        return []  # a PUT is atomic; an interrupted multipart upload leaves no object (the bucket's lifecycle rule aborts it)


# -- the conditional requests of each service -----------------------------------------------------------
class _Conditional:
    async def size(self, b: ObjectBackend, key: str) -> int | None:
        try:
            info = await b.fs._info(b.path(key))
        except FileNotFoundError:
            return None
        return None if info.get("type") == "directory" else int(info["size"])  # a prefix of other keys is no object

    async def create(self, b: ObjectBackend, key: str, data: bytes) -> str | None:
        raise NotImplementedError

    async def read_version(self, b: ObjectBackend, key: str) -> Version | None:
        raise NotImplementedError

    async def swap(self, b: ObjectBackend, key: str, data: bytes, tag: str) -> str | None:
        raise NotImplementedError

    async def remove(self, b: ObjectBackend, key: str, tag: str) -> bool:
        raise NotImplementedError


class _S3(_Conditional):
    """S3: ``PUT If-None-Match: *`` creates, ``PUT If-Match: <etag>`` swaps, ``DELETE If-Match: <etag>`` removes."""

    async def size(self, b: ObjectBackend, key: str) -> int | None:
        try:
            head = await b.fs._call_s3("head_object", Bucket=b.bucket, Key=b.object_key(key))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    async def create(self, b: ObjectBackend, key: str, data: bytes) -> str | None:
        return await self._put(b, key, data, IfNoneMatch="*")

    async def read_version(self, b: ObjectBackend, key: str) -> Version | None:
        try:
            resp = await b.fs._call_s3("get_object", Bucket=b.bucket, Key=b.object_key(key))
        except FileNotFoundError:
            return None
        async with resp["Body"] as body:
            data = await body.read()
        served = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(served).timestamp() if served else time.time()  # the server's clock: no skew
        modified = resp["LastModified"]
        age = now - (modified.timestamp() if isinstance(modified, datetime) else float(modified))
        return Version(bytes(data), str(resp["ETag"]), max(0.0, age))

    async def swap(self, b: ObjectBackend, key: str, data: bytes, tag: str) -> str | None:
        return await self._put(b, key, data, IfMatch=tag)

    async def remove(self, b: ObjectBackend, key: str, tag: str) -> bool:
        try:
            await b.fs._call_s3("delete_object", Bucket=b.bucket, Key=b.object_key(key), IfMatch=tag)
        except OSError as e:
            if _status(e) in (404, 412) or isinstance(e, FileNotFoundError):
                return False
            raise
        return True

    async def _put(self, b: ObjectBackend, key: str, data: bytes, **condition: str) -> str | None:
        """The new ETag, or None on 412 (or 404 for If-Match); 409 conflicts are retried."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                resp = await b.fs._call_s3("put_object", Bucket=b.bucket, Key=b.object_key(key), Body=data, **condition)
                return str(resp["ETag"])
            except OSError as e:
                status = _status(e)
                if status == 412 or isinstance(e, FileExistsError) or (status == 404 and "IfMatch" in condition):
                    return None
                if status != 409 or attempt == CONFLICT_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        return None


class _Gcs(_Conditional):
    """GCS: uploads with ``ifGenerationMatch=0`` create, ``ifGenerationMatch=<generation>`` swap; deletes likewise."""

    async def create(self, b: ObjectBackend, key: str, data: bytes) -> str | None:
        try:
            await b.fs._pipe_file(b.path(key), data, mode="create")  # a multipart upload with ifGenerationMatch=0
        except FileExistsError:
            return None
        meta = await b.fs._call("GET", "b/{}/o/{}", b.bucket, b.object_key(key), json_out=True)
        return str(meta["generation"])

    async def read_version(self, b: ObjectBackend, key: str) -> Version | None:
        try:
            meta = await b.fs._call("GET", "b/{}/o/{}", b.bucket, b.object_key(key), json_out=True)
            _, data = await b.fs._call("GET", "b/{}/o/{}", b.bucket, b.object_key(key), alt="media", generation=meta["generation"])
        except FileNotFoundError:
            return None
        updated = datetime.fromisoformat(meta["updated"].replace("Z", "+00:00")).timestamp()
        return Version(bytes(data), str(meta["generation"]), max(0.0, time.time() - updated))

    async def swap(self, b: ObjectBackend, key: str, data: bytes, tag: str) -> str | None:
        try:
            out = await b.fs._call(
                "POST", f"{b.fs._location}/upload/storage/v1/b/{b.bucket}/o", uploadType="media", name=b.object_key(key),
                ifGenerationMatch=tag, data=data, json_out=True,
            )  # fmt: skip
        except (FileExistsError, FileNotFoundError):
            return None
        return str(out["generation"])

    async def remove(self, b: ObjectBackend, key: str, tag: str) -> bool:
        try:
            await b.fs._call("DELETE", "b/{}/o/{}", b.bucket, b.object_key(key), ifGenerationMatch=tag)
        except (FileExistsError, FileNotFoundError):
            return False
        return True


_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()


def _close_at_exit(fs: Any) -> None:
    """Close the filesystem's HTTP session before zarr's loop stops (an open one warns at exit)."""
    if not _OPEN:
        atexit.register(_close_all)  # registered after zarr's own handler, so it runs before it
    _OPEN.add(fs)


def _close_all() -> None:
    async def close(fs: Any) -> None:
        s3 = getattr(fs, "_s3creator", None)
        if s3 is not None:
            await s3.__aexit__(None, None, None)
        session = getattr(fs, "_session", None)
        if session is not None and not getattr(session, "closed", True):
            await session.close()

    for fs in list(_OPEN):
        if getattr(fs, "_pid", os.getpid()) == os.getpid():
            with contextlib.suppress(Exception):
                _sync(close(fs))
    _OPEN.clear()


# errors of the clients' network layers (botocore, aiohttp, the resolver) that mean the endpoint cannot be reached
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError", "gaierror"}
OBSTORE_UNREACHABLE = "error sending request"  # reqwest's words when a connection cannot be made (refused, DNS, TLS)


def _unreachable(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) says the endpoint cannot be reached, rather than anything about a request."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionError | TimeoutError) or UNREACHABLE & {c.__name__ for c in type(seen).__mro__}:
            return True
        if type(seen).__module__.startswith("obstore") and OBSTORE_UNREACHABLE in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _status(e: BaseException) -> int | None:
    """The HTTP status behind an s3fs error (its cause is botocore's ClientError)."""
    cause = e.__cause__
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


async def _gather(coros: Sequence[Coroutine[Any, Any, T]], limit: int = CONCURRENCY) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def bounded(c: Coroutine[Any, Any, T]) -> T:
        async with sem:
            return await c

    return list(await asyncio.gather(*(bounded(c) for c in coros)))


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on zarr's event loop (where the filesystem's sessions live) and wait for it."""
    from zarr.core.sync import sync

    return sync(coro)
