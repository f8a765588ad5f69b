"""The local-disk backend: POSIX files, atomic by rename, exclusive by hard link (the protocol as it always was).

A store is built in a temporary sibling folder and renamed into place; every object is written through a temporary
``*.partial`` file and renamed (or hard-linked, when it must not exist yet). A version tag is the inode and a hash of
the content; compare-and-swap renames the file aside, checks it, and links the new one in (or puts the old back).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fcache.store.backends import Backend, Range, Version

TEMP_SUFFIX = ".partial"


class LocalBackend(Backend):
    remote = False
    root: Path

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = str(root)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def where(self, key: str = "") -> str:
        return str(self.path(key))

    @property
    def location(self) -> tuple[str, ...]:
        return ("file", *self.root.resolve().parts)

    def zarr_store(self, read_only: bool = True) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=read_only)

    # -- whole objects ------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def get_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        out: list[bytes] = []
        fds: dict[str, int] = {}  # one open file per object, however many of its ranges are asked for
        try:
            for r in ranges:
                fd = fds.get(r.key)
                if fd is None:
                    fd = fds[r.key] = os.open(self.path(r.key), os.O_RDONLY)
                if r.start < 0 or r.stop is None:
                    size = os.fstat(fd).st_size
                    start = max(0, size + r.start) if r.start < 0 else r.start
                    out.append(os.pread(fd, size - start, start))
                else:
                    out.append(os.pread(fd, r.stop - r.start, r.start))
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def sizes(self, keys: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        for k in keys:
            p = self.path(k)
            out.append(p.stat().st_size if p.is_file() else None)
        return out

    def put(self, key: str, data: bytes) -> None:
        self._replace(key, data, flush=True)

    def put_many(self, objects: Mapping[str, bytes]) -> None:
        """Each object whole by a rename, not flushed to the disk one by one (as zarr writes chunks): thousands of small
        objects, the driver's targets of a new store."""
        for key, data in objects.items():
            self._replace(key, data, flush=False)

    def _replace(self, key: str, data: bytes, flush: bool) -> None:
        path = self.path(key)
        tmp = self._write_temp(path, data, flush)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: str | Path) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, keys: Iterable[str]) -> None:
        for k in keys:
            self.path(k).unlink(missing_ok=True)

    def listing(self, prefix: str = "") -> dict[str, int]:
        cut = len(str(self.root)) + 1
        return {e.path[cut:]: e.stat(follow_symlinks=False).st_size for e in _files_under(self.path(prefix))}

    # -- the commit protocol ------------------------------------------------------------------------
    def create(self, key: str, data: bytes) -> str | None:
        path = self.path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
            return _tag(tmp.stat().st_ino, data)
        except FileExistsError:
            current = self.read_version(key)  # the same bytes are ours (records carry a unique token), as on object storage
            return current.tag if current is not None and current.data == data else None
        finally:
            tmp.unlink(missing_ok=True)

    def read_version(self, key: str) -> Version | None:
        path = self.path(key)
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return Version(data, _tag(st.st_ino, data), time.time() - st.st_mtime)

    def swap(self, key: str, data: bytes, tag: str) -> str | None:
        path = self.path(key)
        with self._set_aside(path, tag) as taken:
            if not taken:
                return None
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return None  # created by someone else while ours was aside: theirs stands
            finally:
                tmp.unlink(missing_ok=True)
            return _tag(path.stat().st_ino, data)

    def renew(self, key: str, data: bytes, tag: str) -> str | None:
        current = self.read_version(key)
        if current is None or current.tag != tag:
            return None
        try:
            os.utime(self.path(key))
        except FileNotFoundError:
            return None
        return tag

    def remove(self, key: str, tag: str) -> bool:
        with self._set_aside(self.path(key), tag) as taken:
            return taken

    @contextlib.contextmanager
    def _set_aside(self, path: Path, tag: str) -> Any:
        """Rename ``path`` aside; yields whether it had ``tag`` (if not, it is put back). The aside copy is deleted."""
        grave = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.stale")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            yield False
            return
        try:
            ours = _tag(grave.stat().st_ino, grave.read_bytes()) == tag
            if not ours:
                with contextlib.suppress(FileExistsError):
                    os.link(grave, path)
            yield ours
        finally:
            grave.unlink(missing_ok=True)

    # -- whole stores -------------------------------------------------------------------------------
    def new_store(self, build: Callable[[Any], None]) -> None:
        from zarr.storage import LocalStore

        tmp = self.root.with_name(f".{self.root.name}.{os.getpid()}{TEMP_SUFFIX}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(LocalStore(tmp, read_only=False))
            os.replace(tmp, self.root)  # a store appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def clear(self, keep: Sequence[str] = ()) -> None:
        if self.root.is_dir():
            shutil.rmtree(self.root)

    def is_empty(self) -> bool:
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

    def temporaries(self) -> list[str]:
        cut = len(str(self.root)) + 1
        return sorted(e.path[cut:] for e in _files_under(self.root) if e.name.endswith(TEMP_SUFFIX))

    def delete_temporaries(self, keys: Sequence[str]) -> None:
        for key in keys:
            p = self.path(key)
            if p.parent.is_dir():
                for tmp in p.parent.glob(f"{p.name}.*{TEMP_SUFFIX}"):
                    tmp.unlink(missing_ok=True)

    def _write_temp(self, path: Path, data: bytes, flush: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
            if flush:
                f.flush()
                os.fsync(f.fileno())
        return tmp


def _files_under(root: Path) -> Iterator[os.DirEntry]:
    """Every file below ``root`` (symbolic links not followed): one ``scandir`` per folder, no path objects per file."""
    folders = [str(root)] if root.is_dir() else []
    while folders:
        with os.scandir(folders.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    folders.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    yield e


def _tag(inode: int, data: bytes) -> str:
    return f"{inode}:{hashlib.sha1(data).hexdigest()[:16]}"
