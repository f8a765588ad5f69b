"""The RUN lease: one training process per RUN folder at a time (``RUN/train.lease``, a :class:`~fcache.store.leases.Lease`,
as extract's driver lease is for a store).

``train-head`` takes the lease of each RUN folder it trains into after checking them and before writing anything, renews
it every ``HEARTBEAT_S`` while it runs and removes it at the end; a second ``train-head`` (or a sweep variant) on the same
folder is refused with a line naming the holder's command, pid, host and start time. A lease is stale, and taken over,
when its holder ran on this host and its process is gone (a run killed with ``kill -9``) or, on another host sharing
the folder, when it was not renewed for ``LEASE_TIMEOUT_S``. ``fcache runs`` reads it: a live holder is a running run,
a stale lease a stopped one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fcache.common.command import command_line
from fcache.common.errors import InputError
from fcache.store.backends.local import LocalBackend
from fcache.store.leases import Lease, is_stale, parse

LEASE = "train.lease"
LEASE_TIMEOUT_S = 1800.0
HEARTBEAT_S = 60.0


class RunLease:
    """The lease of the training in this process on the RUN folder ``path`` (a context manager: acquire, release)."""

    def __init__(self, path: str | Path, *, heartbeat: float = HEARTBEAT_S) -> None:
        self.path = Path(path)
        backend = LocalBackend(self.path)
        self.lease = Lease(backend, LEASE, timeout=LEASE_TIMEOUT_S, heartbeat=heartbeat, command=command_line(sys.argv[1:]))
        self._made: list[Path] = []  # folders made to hold the lease, outermost first

    def acquire(self) -> None:
        """Take the lease (a stale one is taken over), making the folder if it does not exist yet.

        Raises:
            InputError: a live process holds it (the folder is left as it was).
        """
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self._made = missing[::-1]
        holder = self.lease.acquire()
        if holder is not None:
            self._unmake()
            if not holder:
                raise InputError(f"{self.path}: could not take the RUN lease {LEASE} (other processes keep taking it); rerun")
            raise InputError(held_message(self.path, holder))

    def release(self) -> None:
        """Stop renewing and remove the lease (unless taken over); a folder made for it and left empty goes too."""
        self.lease.release()
        self._unmake()

    def _unmake(self) -> None:
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: the run wrote into it
                folder.rmdir()
        self._made = []

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def holder(path: str | Path) -> tuple[dict[str, Any], bool] | None:
    """The RUN folder's lease: its holder's record (command, pid, host, started) and whether the holder is alive; None
    when no process holds or held it (a run that ended, or one of a release without leases)."""
    current = LocalBackend(Path(path)).read_version(LEASE)
    if current is None:
        return None
    info = parse(current.data)
    return info, not is_stale(info, current.age, LEASE_TIMEOUT_S)


def held_message(path: Path, info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (
        f"{path} is being trained by another process ({info.get('command', 'fcache')}, pid {info.get('pid')} on {info.get('host')}, "
        f"since {since}); wait for it to finish, or stop it and rerun this command (the lease of a killed run is taken over)"
    )
