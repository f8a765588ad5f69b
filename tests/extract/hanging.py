"""A test-only folder source whose decode misbehaves on purpose, importable by dask workers and decode processes.

Keys containing ``hang`` sleep (a hang SIGALRM can interrupt); ``stuck`` blocks SIGALRM first (like C code that never
returns to Python: only a kill ends it); ``crash`` kills its own process (a crashing decoder). ``delay`` slows every
sample down without changing what it decodes to.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fcache.extract.sources.base import Decoded, SampleRef
from fcache.extract.sources.folder import FolderSource


class HangingFolder(FolderSource):
    def __init__(self, root: str | Path, *, delay: float = 0.0, **kw: object) -> None:
        super().__init__(root, **kw)  # type: ignore[arg-type]
        self.delay = delay

    def decode(self, ref: SampleRef) -> Decoded:
        time.sleep(self.delay)
        if "stuck" in ref.key:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        if "hang" in ref.key:
            time.sleep(3600)
        if "crash" in ref.key:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().decode(ref)
