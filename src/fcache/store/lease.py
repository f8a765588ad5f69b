"""The driver lease: one extraction driver per store at a time (``ledger/driver.lease``, JSON: host, pid, start time).

A driver takes the lease exclusively (a hard link of a complete file: the first one wins) before it changes a
store, refreshes its mtime every ``HEARTBEAT_S`` while it runs and deletes it at the end; another driver is
refused with a message naming the holder. A lease is stale, and taken over, when its holder ran on this host and
its process is gone (or its pid now belongs to a younger process), or, for a holder on another host, when it was
not refreshed for ``LEASE_TIMEOUT_S`` (30 minutes). The lease is advisory on top of the commit protocol: unit
locks and exclusive commits keep the store sound even if two drivers ever ran at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fcache.common.command import command_line
from fcache.common.errors import LeaseHeld
from fcache.store import layout

LEASE_FILE = "driver.lease"
LEASE_TIMEOUT_S = 1800.0
HEARTBEAT_S = 60.0


class DriverLease:
    """The lease of the driver running in this process (a context manager: acquire on enter, release on exit)."""

    def __init__(self, root: str | Path, *, timeout: float = LEASE_TIMEOUT_S, heartbeat: float = HEARTBEAT_S) -> None:
        self.root = Path(root)
        self.path = self.root / layout.LEDGER / LEASE_FILE
        self.timeout, self.heartbeat = timeout, heartbeat
        self.token = os.urandom(8).hex()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease (again, if a store was just replaced under it); take over a stale one.

        Raises:
            LeaseHeld: a live driver holds it.
        """
        if self.held():
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "started": time.time()}
        me |= {"token": self.token, "command": command_line(sys.argv[1:])}
        for _ in range(3):
            if layout.write_json_atomic(self.path, me, exclusive=True):
                self._start_heartbeat()
                return
            info, age = read_lease(self.path)
            if info is None:
                continue  # vanished in between
            if not is_stale(info, age, self.timeout):
                raise LeaseHeld(held_message(self.root, info))
            _remove_if_unchanged(self.path, info)
        raise LeaseHeld(f"{self.root}: could not take the driver lease {self.path} (other drivers keep taking it); rerun")

    def held(self) -> bool:
        info, _ = read_lease(self.path)
        return info is not None and info.get("token") == self.token

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, unless another driver has taken it over meanwhile."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="fcache-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self.held():
                return
            try:
                os.utime(self.path)
            except OSError:
                return


def read_lease(path: Path) -> tuple[dict[str, Any] | None, float]:
    """The lease's content ({} when unreadable) and its age in seconds since the last heartbeat; (None, 0) when absent."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None, 0.0
    try:
        info = json.loads(text)
    except ValueError:
        return {}, age
    return (info if isinstance(info, dict) else {}), age


def is_stale(info: dict[str, Any], age: float, timeout: float = LEASE_TIMEOUT_S) -> bool:
    """Same host: stale when the pid is dead or was reused. Another host (or unreadable): when not refreshed for ``timeout``."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return age > timeout
    pid = info["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = info.get("pid_start")
    return start is not None and _process_start(pid) not in (None, start)


def held_message(root: Path, info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (
        f"{root} is being extracted by another driver ({info.get('command', 'fcache')}, pid {info.get('pid')} on "
        f"{info.get('host')}, since {since}); wait for it to finish, or stop it and rerun this command "
        f"(a lease whose driver died is taken over automatically)"
    )


def _remove_if_unchanged(path: Path, info: dict[str, Any]) -> None:
    """Delete a stale lease, unless another driver replaced it since it was read (then put that one back)."""
    grave = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.stale")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    try:
        moved, _ = read_lease(grave)
        if moved != info:
            with contextlib.suppress(FileExistsError):
                os.link(grave, path)
    finally:
        grave.unlink(missing_ok=True)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
