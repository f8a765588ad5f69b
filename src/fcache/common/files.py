"""Writing a file so that it appears whole or not at all, and saying clearly why an output path cannot be written.

Every file fcache replaces (RUN checkpoints and weights, config.json, metrics, predictions, errors.jsonl) is written
to a temporary beside it (``.NAME.PID.partial``) and renamed into place; whatever goes wrong, the temporary is
removed (where it can be: on a read-only disk there is none). A failed write on a full disk becomes
``OSError(ENOSPC)`` (torch and safetensors report it as a RuntimeError), which the command turns into one line.
Temporaries a killed process left are removed by the next writer of the same folder (:func:`remove_stale`).

An output path that cannot be written (a read-only filesystem, a folder without write permission, a part of the
path that is a file) is refused before a command works (:func:`check_writable`); an ``OSError`` of that kind met
later is told as one line naming the path (:func:`unusable_path`), the temporary's name turned back into the file's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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
        with contextlib.suppress(OSError):  # a read-only folder holds no temporary, and refuses to unlink one
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


# Why a path cannot be used, by errno: the OSErrors that come from the path the user gave, not from fcache.
UNUSABLE = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "something is there already",
}
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.\d+(-[0-9a-f]+)?\.partial$")


def shown_path(filename: str | os.PathLike) -> str:
    """``filename`` as the user knows it: a temporary of fcache's (``.NAME.PID.partial``) named as the file it stands for."""
    p = Path(filename)
    m = _TEMPORARY.match(p.name)
    return str(p.with_name(m["name"])) if m else str(p)


def unusable_path(e: OSError) -> str | None:
    """One line for an ``OSError`` of a path that cannot be written or read as asked (permissions, a read-only file system,
    a file where a folder must be): the path and why; None for any other error, or one that names no path."""
    if e.errno not in UNUSABLE or not e.filename:
        return None
    return f"cannot use {shown_path(e.filename)}: {UNUSABLE[e.errno]}; check the path and its permissions, or give another one"


def check_writable(path: str | Path, what: str, *, folder: bool = True, fix: str = "give a path you can write to") -> None:
    """Refuse, before any work, an output ``path`` (a folder, or a file with ``folder=False``) that cannot be written:
    a part of it is a file, it is a file where a folder is wanted (or a folder where a file is), or the folder that
    would hold it is read-only or not writable by this user. ``what`` names it in the message (``--out``, ``RUN``),
    ``fix`` says what to do instead.

    Raises:
        InputError: one line naming the path and why.
    """
    from fcache.common.errors import InputError

    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise InputError(f"{what} {p} is a file, not a folder; give a folder")
        if not folder and p.is_dir():
            raise InputError(f"{what} {p} is a folder; give a file name")
    here = p if folder and p.is_dir() else p.parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise InputError(f"{what} {p}: {here} is a file, not a folder; give a path under a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(here) else "is not writable by you"
        raise InputError(f"{what} {p}: {here} {why}; {fix}")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
