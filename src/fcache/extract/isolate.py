"""Decoding untrusted media in child processes, every sample under a deadline that the parent enforces.

The cluster's unit tasks run in dask worker threads, where SIGALRM cannot reach, so each worker decodes through a
``DecodePool``: child processes that each run ``load_sample`` (decode + views) for one sample at a time, on their
own main thread, with the usual SIGALRM deadline (``--decode-timeout``). A child that overruns the deadline plus a
grace period (stuck in C code that never returns to Python) is killed with SIGKILL and replaced, and its sample gets
status ``timeout``; a child that dies while decoding (a crashing decoder) costs its sample (``decode_error``). One
poisonous file costs one sample, never the worker. Children are plain ``subprocess`` processes (``python -m
fcache.extract.isolate``), so daemonic dask workers, which multiprocessing refuses, can start them too; a child
exits when its parent's pipe closes, or when it finds itself orphaned. Items travel as pickles over private pipes
between processes of the same user; nothing here reads pickles from anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait

import cloudpickle
import torch

from fcache.extract.sources.base import SampleRef, Source
from fcache.extract.stages import SampleItem, failed_sample, load_sample
from fcache.spec import Manifest, Status

START_TIMEOUT_S = 300.0  # a child imports torch and unpickles the source before it is ready


def grace_s(timeout: float) -> float:
    """Time past ``timeout`` before a child is killed: views and pickling after a slow decode still fit."""
    return max(5.0, 0.5 * timeout)


class _Child:
    """One decode process and its two pipes (jobs in, items out)."""

    def __init__(self, setup: bytes) -> None:
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the parent's imports resolve alike
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fcache.extract.isolate", str(job_r), str(out_w)], pass_fds=(job_r, out_w), env=env
        )
        os.close(job_r)
        os.close(out_w)
        self.jobs = Connection(job_w, readable=False)
        self.out = Connection(out_r, writable=False)
        self.ready = False
        threading.Thread(target=self._send, args=(setup,), daemon=True).start()  # the child reads it once its imports are done

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the child died at start-up: its exit code is reported when its hello is missing
            self.jobs.send_bytes(data)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.jobs.close()
        self.out.close()


class DecodePool:
    """``processes`` decode children for one source; ``map`` yields ``load_sample`` items in the order asked."""

    def __init__(
        self, source: Source, manifest: Manifest, *, processes: int = 1, timeout: float = 60.0, grace: float | None = None
    ) -> None:
        self.m, self.timeout = manifest, timeout
        self.grace = grace_s(timeout) if grace is None else grace
        self._setup = cloudpickle.dumps((source, manifest, timeout))  # as dask sends it: a source class may live in a script
        self._children = [_Child(self._setup) for _ in range(max(1, processes))]
        self.restarts = 0

    def map(self, jobs: Sequence[tuple[int, SampleRef]]) -> Iterator[SampleItem]:
        """Decode (index, ref) pairs, at most one per child at a time; items come back in the order of ``jobs``."""
        todo = deque(enumerate(jobs))
        busy: dict[int, tuple[int, int, SampleRef, float]] = {}  # child slot -> (position, index, ref, deadline)
        done: dict[int, SampleItem] = {}
        nxt = 0
        try:
            while nxt < len(jobs):
                self._start_ready()
                self._dispatch(todo, busy)
                if busy or any(not c.ready for c in self._children):
                    done.update(self._collect(busy))
                    self._dispatch(todo, busy)  # children decode ahead while the caller consumes what came back
                while nxt in done:
                    yield done.pop(nxt)
                    nxt += 1
        finally:
            for slot in list(busy):  # abandoned mid-way: a late answer must not reach the next map
                self._replace(slot)

    def _dispatch(self, todo: deque[tuple[int, tuple[int, SampleRef]]], busy: dict[int, tuple[int, int, SampleRef, float]]) -> None:
        """Send the next jobs to the ready children that have none."""
        for slot, child in enumerate(self._children):
            if todo and slot not in busy and child.ready:
                pos, (index, ref) = todo.popleft()
                try:
                    child.jobs.send_bytes(pickle.dumps((index, ref)))
                except OSError:  # it died while idle: a fresh one takes the job
                    todo.appendleft((pos, (index, ref)))
                    self._replace(slot)
                    continue
                busy[slot] = (pos, index, ref, self._deadline())

    def close(self) -> None:
        for child in self._children:
            child.kill()
        self._children = []

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout + self.grace if self.timeout > 0 else float("inf")

    def _start_ready(self) -> None:
        """Block until some child has started when none has (start-up never counts against a sample's deadline)."""
        if any(c.ready for c in self._children):
            return
        starting = {c.out: c for c in self._children}
        for conn in wait(list(starting), timeout=START_TIMEOUT_S):
            self._hello(starting[conn])  # type: ignore[index]
        if not any(c.ready for c in self._children):
            raise RuntimeError(f"no decode process started within {START_TIMEOUT_S:.0f}s; see the worker's log")

    def _hello(self, child: _Child) -> None:
        try:
            child.out.recv_bytes()
        except (EOFError, OSError):
            raise RuntimeError(f"a decode process failed to start (exit code {child.proc.wait()}); see the worker's log") from None
        child.ready = True

    def _collect(self, busy: dict[int, tuple[int, int, SampleRef, float]]) -> dict[int, SampleItem]:
        """Wait for the first answer, start-up or deadline; return the items that finished, by position."""
        starting = {c.out: c for c in self._children if not c.ready}
        answers = {self._children[slot].out: slot for slot in busy}
        left = min((deadline for *_, deadline in busy.values()), default=float("inf")) - time.monotonic()
        ready = wait([*answers, *starting], timeout=None if left == float("inf") else max(0.0, left))
        out: dict[int, SampleItem] = {}
        for conn in ready:
            if conn in starting:
                self._hello(starting[conn])
                continue
            slot = answers[conn]  # type: ignore[index]
            pos, index, ref, _ = busy.pop(slot)
            try:
                item = SampleItem.from_dict(pickle.loads(conn.recv_bytes()))  # type: ignore[union-attr]
            except (EOFError, OSError):
                code = self._exit_code(slot)
                self._replace(slot)
                message = f"the decode process died (exit code {code}) while decoding {ref.key}"
                item = failed_sample(index, ref.key, self.m, Status.DECODE_ERROR, message)
            out[pos] = item
        now = time.monotonic()
        for slot, (pos, index, ref, deadline) in list(busy.items()):
            if now > deadline:
                del busy[slot]
                self._replace(slot)
                message = f"decoding {ref.key} took longer than {self.timeout:g}s (its decode process was killed)"
                out[pos] = failed_sample(index, ref.key, self.m, Status.TIMEOUT, message)
        return out

    def _exit_code(self, slot: int) -> int | None:
        """The exit code of a child whose pipe closed (None if it still runs)."""
        try:
            return self._children[slot].proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None

    def _replace(self, slot: int) -> None:
        """Kill a child (stuck, dead or abandoned) and start a fresh one in its slot."""
        self._children[slot].kill()
        self._children[slot] = _Child(self._setup)
        self.restarts += 1


def _orphan_watch(parent: int) -> None:
    """Exit when the parent is gone (its pipe may not close while this process is stuck decoding)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _child_main(job_fd: int, out_fd: int) -> None:
    """A decode child: setup (source, manifest, timeout), then one (index, ref) -> item at a time until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the driver, which closes the pipes
    torch.set_num_threads(1)
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    jobs, out = Connection(job_fd, writable=False), Connection(out_fd, readable=False)
    source, manifest, timeout = pickle.loads(jobs.recv_bytes())
    out.send_bytes(b"ready")
    while True:
        try:
            index, ref = pickle.loads(jobs.recv_bytes())
        except EOFError:
            return
        item = load_sample(source, ref, index, manifest, timeout).to_dict()
        try:
            out.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the parent is gone
            return


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
