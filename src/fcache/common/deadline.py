"""One way to bound how long a block may run: SIGALRM where it can reach, a cooperative check everywhere.

Decoding untrusted media must not hang a run. ``deadline(seconds)`` interrupts the block with ``DeadlineExceeded``
from a SIGALRM handler when it runs on a process's main thread and no other alarm is pending (a deadline opened
inside another one leaves the outer alarm alone), and yields a ``check()`` that raises it past the deadline wherever
the block runs (between video frames, say). A thread that never returns to Python is beyond both: the extraction's
decode processes are killed from outside for that (``fcache.extract.isolate``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class DeadlineExceeded(Exception):
    """The block outlived its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Callable[[], None]]:
    """Run the block under a deadline of ``seconds`` (<= 0: none); yields ``check()``, which raises past it."""
    end = time.monotonic() + seconds

    def check() -> None:
        if seconds > 0 and time.monotonic() > end:
            raise DeadlineExceeded

    on_main = threading.current_thread() is threading.main_thread()
    if seconds <= 0 or not on_main or not hasattr(signal, "SIGALRM") or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield check
        return

    def expire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield check
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
