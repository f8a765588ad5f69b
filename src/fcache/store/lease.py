"""The driver lease: one extraction driver per store at a time (``ledger/driver.lease``, a :class:`~fcache.store.leases.Lease`).

A driver takes the lease exclusively before it changes a store, renews it every ``HEARTBEAT_S`` while it runs and
removes it at the end; another driver is refused with a message naming the holder. A lease is stale, and taken over,
when its holder ran on this host and its process is gone (or its pid now belongs to a younger process), or, for a
holder on another host, when it was not renewed for ``LEASE_TIMEOUT_S`` (30 minutes). On local disk and on object
storage alike (exclusive create, compare-and-swap; see ``fcache.store.backends``). The lease is advisory on top of
the commit protocol: unit locks and exclusive commits keep the store sound even if two drivers ever ran at once.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from fcache.common.command import command_line, rerun
from fcache.common.errors import LeaseHeld
from fcache.store import layout
from fcache.store.backends import ROOT_META, Backend, open_backend
from fcache.store.leases import Lease
from fcache.store.leases import is_stale as _is_stale

LEASE_FILE = "driver.lease"
LEASE_KEY = f"{layout.LEDGER}/{LEASE_FILE}"
LEASE_TIMEOUT_S = 1800.0
HEARTBEAT_S = 60.0
T = TypeVar("T")


class DriverLease:
    """The lease of the driver running in this process (a context manager: acquire on enter, release on exit)."""

    def __init__(
        self,
        root: str | Path | Backend,
        *,
        timeout: float = LEASE_TIMEOUT_S,
        heartbeat: float = HEARTBEAT_S,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = open_backend(root, storage_options)
        self.root = self.backend.url
        self.lease = Lease(self.backend, LEASE_KEY, timeout=timeout, heartbeat=heartbeat, command=command_line(sys.argv[1:]))

    @property
    def token(self) -> str:
        return self.lease.token

    def acquire(self) -> None:
        """Take the lease (again, if a store was just replaced under it); take over a stale one.

        Raises:
            LeaseHeld: a live driver holds it.
        """
        if self.lease.tag is not None and self.held():
            return
        self.lease.tag = None
        holder = self.lease.acquire()
        if holder is not None:
            if not holder:
                raise LeaseHeld(f"{self.root}: could not take the driver lease {LEASE_KEY} (other drivers keep taking it); rerun")
            raise LeaseHeld(held_message(self.root, holder))

    def held(self) -> bool:
        return self.lease.held()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another driver has taken it over meanwhile."""
        self.lease.release()

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def is_stale(info: dict[str, Any], age: float, timeout: float = LEASE_TIMEOUT_S) -> bool:
    """Same host: stale when the pid is dead or was reused. Another host (or unreadable): when not renewed for ``timeout``."""
    return _is_stale(info, age, timeout)


def held_message(root: str | Path, info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (
        f"{root} is being extracted by another driver ({info.get('command', 'fcache')}, pid {info.get('pid')} on "
        f"{info.get('host')}, since {since}); wait for it to finish, or stop it and rerun this command "
        f"(a lease whose driver died is taken over automatically)"
    )


@contextlib.contextmanager
def leased_store(backend: Backend, make: Callable[[], T]) -> Iterator[tuple[T, bool]]:
    """``make()`` (creating or reopening the store at ``backend``, e.g. ``fcache.store.create``) and the work after it,
    under this driver's lease, taken before anything is replaced and held to the end; yields what ``make`` returned and
    whether the store existed before.

    On local disk a new store appears by a rename, so its lease is taken once it exists; in object storage the lease
    is taken first, so one driver at a time builds the store in place (invisible until its manifest is written).
    """
    lease = DriverLease(backend)
    existed = backend.exists(ROOT_META)
    try:
        if existed or backend.remote:
            lease.acquire()
        try:
            made = make()
        except OSError as e:
            lost = isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY)
            if not existed and lost and backend.exists(ROOT_META):
                raise LeaseHeld(f"another driver created {backend.url} at the same moment; rerun this command once it is done") from None
            raise
        lease.acquire()  # a new store (or one just replaced by --overwrite) gets its lease now
        yield made, existed
    finally:
        lease.release()


def interrupted_message(backend: Backend) -> str:
    """What an interrupted driver kept in the store at ``backend`` and the command that continues it."""
    manifest = layout.read_manifest(backend) if backend.exists(ROOT_META) else None
    if manifest is None:
        return f"nothing was written to {backend.url}"
    units = layout.units(manifest.dataset.n, manifest.storage.shard_size)
    done = len(layout.read_records(backend, units))
    return f"{done} of {len(units)} units of {backend.url} are committed and kept; continue with: {rerun(drop=('--overwrite',))}"
