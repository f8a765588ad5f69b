"""Leases: an object that says "this process is working on X", taken exclusively, renewed while alive, expiring.

A lease is a JSON object (host, pid, process start time, start time, a unique token, a renewal count) created with
the backend's exclusive ``create``. Its holder renews it every ``heartbeat`` seconds from a background thread and
removes it when done, each time only if it is still the holder's (``renew`` / ``remove`` compare the version tag). A
lease is stale, and taken over with a compare-and-swap so that exactly one contender wins, when its holder ran on
this host and its process is gone (or its pid now belongs to a younger process), or, for a holder on another host,
when it was not renewed for ``timeout`` seconds (its age is measured by the storage: the file's mtime, or on S3 the
server's clock, so client clocks do not matter). Unit write locks and the driver lease are both leases.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fcache.store.backends import Backend


class Lease:
    """One lease ``key`` on ``backend``; ``acquire`` returns None when taken, else the live holder's content."""

    def __init__(self, backend: Backend, key: str, *, timeout: float, heartbeat: float | None = None, command: str = "") -> None:
        self.backend, self.key = backend, key
        self.timeout, self.heartbeat = timeout, heartbeat
        self.token = os.urandom(8).hex()
        self.info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "started": time.time(),
            "token": self.token,
            "command": command or " ".join(["fcache", *sys.argv[1:3]]),
            "renewed": 0,
        }
        self.tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def body(self) -> bytes:
        return json.dumps(self.info, sort_keys=True).encode()

    def acquire(self, attempts: int = 3) -> dict[str, Any] | None:
        """Take the lease (a stale one is taken over). None when this process holds it, else the holder's content."""
        holder: dict[str, Any] = {}
        for _ in range(attempts):
            tag = self.backend.create(self.key, self.body())
            if tag is None:
                current = self.backend.read_version(self.key)
                if current is None:
                    continue  # released in between: try again
                holder = parse(current.data)
                if holder.get("token") == self.token:
                    tag = current.tag  # ours already
                elif not is_stale(holder, current.age, self.timeout):
                    return holder
                else:
                    tag = self.backend.swap(self.key, self.body(), current.tag)
            if tag is not None:
                with self._lock:
                    self.tag = tag
                self._start_heartbeat()
                return None
        return holder

    def held(self) -> bool:
        current = self.backend.read_version(self.key)
        return current is not None and parse(current.data).get("token") == self.token

    def renew(self) -> bool:
        """Refresh the lease; False when it was lost (taken over or deleted)."""
        with self._lock:
            if self.tag is None:
                return False
            self.info["renewed"] += 1
            self.tag = self.backend.renew(self.key, self.body(), self.tag)
            return self.tag is not None

    def release(self) -> None:
        """Stop renewing and remove the lease, unless another process holds it by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.tag is not None:
                self.backend.remove(self.key, self.tag)
                self.tag = None

    def _start_heartbeat(self) -> None:
        if self.heartbeat is None or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"fcache-lease-{Path(self.key).name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        assert self.heartbeat is not None
        while not self._stop.wait(self.heartbeat):
            try:
                if not self.renew():
                    return
            except OSError:
                continue  # a failed request: try again at the next beat, the lease has time left


def parse(data: bytes) -> dict[str, Any]:
    """A lease's content; {} when it is not a JSON object (a torn or foreign file: judged by its age alone)."""
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def is_stale(info: dict[str, Any], age: float, timeout: float) -> bool:
    """Same host: stale when the pid is dead or was reused. Another host (or unreadable): when not renewed for ``timeout``."""
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
    return start is not None and process_start(pid) not in (None, start)


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
