"""Ranged GETs and HEADs of an s3:// store through obstore (Rust's object_store), at a quarter of s3fs's CPU per request.

Optional (``fcache[cloud]`` brings it): without obstore, or with a ``--storage-options`` key it cannot honour, s3fs
reads as before. Where obstore connects comes from the s3fs client of the same store, so from the same places as
every other request: its endpoint and signing region as botocore resolved them (the options, ``AWS_ENDPOINT_URL``,
``AWS_REGION``, profiles; on AWS itself the bucket's own region, asked once), its credentials (the options'
``key``/``secret``/``token``, else the session's chain: environment, profiles, SSO, instance roles; refreshable
ones asked again before they expire), its retries and timeouts. ``anon`` sends unsigned requests. obstore's runtime
does not survive a fork: a process forked from one that already read through it reads through s3fs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fcache.store.backends import Range

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Credential, S3Store

# --storage-options keys (s3fs's) and what obstore reads make of them; any other key keeps the reads on s3fs
THROUGH_S3FS = "through the s3fs client"
CLIENT_KWARGS = ("endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")
CONFIG_KWARGS = ("retries", "connect_timeout", "read_timeout", "max_pool_connections", "s3")  # s3: addressing_style only
S3_OPTIONS: dict[str, str] = {
    "endpoint_url": THROUGH_S3FS,
    "key": THROUGH_S3FS,
    "secret": THROUGH_S3FS,
    "token": THROUGH_S3FS,
    "profile": THROUGH_S3FS,
    "anon": "unsigned requests",
    "client_kwargs": f"{THROUGH_S3FS} ({', '.join(CLIENT_KWARGS)})",
    "config_kwargs": f"{THROUGH_S3FS} ({', '.join(CONFIG_KWARGS)}; max_pool_connections does not limit obstore)",
    "use_ssl": THROUGH_S3FS,
    "max_concurrency": "not about reads",
    "use_listings_cache": "not about reads",
    "listings_expiry_time": "not about reads",
    "skip_instance_cache": "not about reads",
    "asynchronous": "not about reads",
    "default_block_size": "not about reads",
    "default_cache_type": "not about reads",
}
DEFAULT_RETRIES = 4  # botocore's default: 5 attempts
CREDENTIALS_TTL = timedelta(minutes=5)  # refreshable credentials are asked again this often (botocore refreshes early)

_RAN_IN: int | None = None  # the process whose obstore runtime has started: its forked children must not use obstore


def unsupported(scheme: str, options: Mapping[str, Any]) -> str | None:
    """Why obstore cannot read a store with these options (None: it can)."""
    if scheme != "s3":
        return f"{scheme}:// reads through gcsfs"
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "obstore is not installed"
    if extra := sorted(set(options) - set(S3_OPTIONS)):
        return f"--storage-options {', '.join(extra)} have no obstore equivalent"
    for name, allowed in (("client_kwargs", CLIENT_KWARGS), ("config_kwargs", CONFIG_KWARGS)):
        if extra := sorted(set(options.get(name) or {}) - set(allowed)):
            return f"--storage-options {name} {', '.join(extra)} have no obstore equivalent"
    s3 = (options.get("config_kwargs") or {}).get("s3") or {}
    if set(s3) - {"addressing_style"}:
        return "--storage-options config_kwargs.s3 other than addressing_style have no obstore equivalent"
    return None


def usable() -> bool:
    """Whether this process may read through obstore (it is not a fork of a process that already did)."""
    return _RAN_IN is None or os.getpid() == _RAN_IN


class ObstoreReads:
    """obstore's S3Store on a bucket, made in each process from that process's s3fs filesystem ``fs``."""

    def __init__(self, bucket: str, options: Mapping[str, Any]) -> None:
        self.bucket, self.options = bucket, dict(options)
        self._store: S3Store | None = None
        self._pid = -1
        self._lock = asyncio.Lock()

    async def get_ranges(self, fs: Any, paths: Sequence[str], ranges: Sequence[Range]) -> list[bytes]:
        """The bytes of each range (``paths[i]``: the object key of ``ranges[i]``), one request each, all in flight.
        (obstore's ``get_ranges`` merges ranges of one object less than 1 MiB apart and sends 10 at once: slower for
        chunks read at random, measured at k = 64 in benchmarks/object_store.py's conditions.)"""
        from fcache.store.backends.objects import _gather

        return await _gather([self.get_range(fs, p, r) for p, r in zip(paths, ranges, strict=True)])

    async def get_range(self, fs: Any, path: str, r: Range) -> bytes:
        """The bytes of one range of the object ``path``, one request."""
        import obstore

        store = await self.store(fs)
        if r.start >= 0 and r.stop is not None:
            return bytes(await obstore.get_range_async(store, path, start=r.start, end=r.stop)) if r.stop > r.start else b""
        span: Any = {"suffix": -r.start} if r.start < 0 else {"offset": r.start}
        result = await obstore.get_async(store, path, options={"range": span})
        return bytes(await result.bytes_async())

    async def size(self, fs: Any, path: str) -> int | None:
        import obstore

        try:
            meta = await obstore.head_async(await self.store(fs), path)
        except FileNotFoundError:
            return None
        return int(meta["size"])

    async def store(self, fs: Any) -> S3Store:
        """This process's S3Store (made at its first request)."""
        global _RAN_IN
        if self._store is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._store is None or self._pid != os.getpid():
                    self._store, self._pid = await self._made(fs), os.getpid()
        _RAN_IN = os.getpid()
        return self._store

    async def _made(self, fs: Any) -> S3Store:
        """An S3Store where the s3fs filesystem ``fs`` connects, signed as it signs, retrying and timing out as it does."""
        from obstore.store import S3Store

        client = await fs.set_session()
        endpoint, conf = str(client.meta.endpoint_url), client.meta.config
        config: S3Config = {"region": client.meta.region_name or "us-east-1"}
        if str(urlparse(endpoint).hostname).endswith(".amazonaws.com"):
            config["region"] = await _bucket_region(client, self.bucket) or config["region"]  # botocore follows redirects
        else:
            config["endpoint"] = endpoint
        if (conf.s3 or {}).get("addressing_style") == "virtual":
            config["virtual_hosted_style_request"] = True
        provider = None
        if self.options.get("anon"):
            config["skip_signature"] = True
        else:
            keys, provider = await _credentials(fs, self.options)
            if keys is not None:
                config["access_key_id"], config["secret_access_key"] = keys[0], keys[1]
                if keys[2]:
                    config["session_token"] = keys[2]
        client_options: ClientConfig = {
            "allow_http": endpoint.startswith("http://"),
            "connect_timeout": timedelta(seconds=conf.connect_timeout),
            "timeout": timedelta(seconds=conf.read_timeout),
        }
        retries = conf.retries or {}
        attempts = retries.get("total_max_attempts") or (retries["max_attempts"] + 1 if "max_attempts" in retries else None)
        retry: RetryConfig = {"max_retries": attempts - 1 if attempts else DEFAULT_RETRIES}
        return S3Store(self.bucket, config=config, client_options=client_options, retry_config=retry, credential_provider=provider)


async def _bucket_region(client: Any, bucket: str) -> str | None:
    """The region AWS keeps ``bucket`` in (``x-amz-bucket-region``, sent even with a 403)."""
    try:
        head = await client.head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - the header rides on errors too; without it, the client's own region
        head = getattr(e, "response", {}) or {}
    return head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")


async def _credentials(fs: Any, options: Mapping[str, Any]) -> tuple[tuple[str, str, str | None] | None, _Refreshed | None]:
    """What obstore signs with: (key, secret, token), the options' as they are, else the session's; or a provider of
    the session's when they refresh; (None, None) when there are none (requests then fail as s3fs's would)."""
    client_kwargs = options.get("client_kwargs") or {}
    key = options.get("key") or client_kwargs.get("aws_access_key_id")
    secret = options.get("secret") or client_kwargs.get("aws_secret_access_key")
    if key and secret:
        return (key, secret, options.get("token") or client_kwargs.get("aws_session_token")), None
    found = await fs.session.get_credentials()
    if found is None:
        return None, None
    if hasattr(found, "refresh_needed"):
        return None, _Refreshed(found)
    frozen = await found.get_frozen_credentials()
    return (frozen.access_key, frozen.secret_key, frozen.token), None


class _Refreshed:
    """obstore's credential provider over botocore's refreshable credentials (asked again every few minutes)."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    def __call__(self) -> S3Credential:
        from fcache.store.backends.objects import _sync

        frozen = _sync(self.credentials.get_frozen_credentials())
        expires = datetime.now(UTC) + CREDENTIALS_TTL
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token, "expires_at": expires}
