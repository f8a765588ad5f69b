"""Writing a file so that it appears whole or not at all, and says so clearly when the disk is full.

Every file fcache replaces (RUN checkpoints and weights, config.json, metrics, predictions, errors.jsonl) is written
to a temporary beside it (``.NAME.PID.partial``) and renamed into place; whatever goes wrong, the temporary is
removed. A failed write on a full disk becomes ``OSError(ENOSPC)`` (torch and safetensors report it as a
RuntimeError), which the command turns into one line. Temporaries a killed process left are removed by the next
writer of the same folder (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".partial"
LOW_SPACE = 64 << 20  # bytes: a failed write with less than this free is taken as a full disk


def temporary_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # readable as the umask allows (safetensors and others create files 0600)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e, path):
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(e: BaseException, path: Path) -> bool:
    """Whether a failed write of ``path`` was the disk filling up."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if isinstance(e, OSError | RuntimeError):
        try:
            return shutil.disk_usage(path.parent).free < LOW_SPACE
        except OSError:
            return False
    return False


def remove_stale(folder: Path, names: tuple[str, ...]) -> None:
    """Delete the temporaries of ``names`` in ``folder`` (left by a writer that was killed)."""
    for name in names:
        for p in folder.glob(f".{name}.*{TEMP_SUFFIX}"):
            p.unlink(missing_ok=True)


def write_json(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write JSON atomically (a temporary file renamed into place), keys sorted."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")
