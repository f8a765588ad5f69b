"""Where a command's outputs go and what they are called: never onto a RUN's files or into an input's folder, never over
a file of the user's, and one file per input named after it.

- :func:`check_outside`: an output that is, or lies inside, a folder it must not touch (the RUN, an input folder).
- :class:`OwnedFolder`: an output folder one command owns (``fcache predict``, ``report``, ``sweep``, ``cka``, ``demo``):
  new, empty, or one it wrote before (its marker file lists what it wrote, with the sha256 of each file), whose earlier
  outputs a rerun replaces; a folder holding anything else, or a file changed since, is refused, untouched.
- :func:`output_names`: the file name of each input (``fcache predict``) or sample (``fcache eval``'s label and depth
  maps): the input's own name, Unicode kept (every filesystem fcache writes to takes it); where it must be changed,
  it gets a short hash of the input's name; two inputs that would still share a name are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fcache.common.errors import InputError
from fcache.common.files import check_writable, write_json

EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,5}$")  # dropped from a name: labels/<name>.png
UNSAFE = frozenset('\\:*?"<>|')  # characters FAT, exFAT and NTFS mounts (and SMB shares) refuse in a name
SEPARATOR = "__"  # a key's folders flattened into one name: a/b/c.jpg -> a__b__c
HASH = 8  # hex digits of the hash a changed name gets: name~1a2b3c4d
MAX_BYTES = 200  # a name's bytes (UTF-8) before its hash and suffix: file names are at most 255 bytes


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:HASH]


def _fold(name: str) -> str:
    """What a case-insensitive, Unicode-normalising filesystem (APFS, HFS+, SMB) takes for the same name."""
    return unicodedata.normalize("NFC", name).casefold()


def _flat(key: str) -> tuple[str, bool]:
    """``key`` as one name without its extension, and whether characters had to be replaced to make it one."""
    name = SEPARATOR.join(EXTENSION.sub("", key).split("/"))
    safe = "".join(c if c.isprintable() and c not in UNSAFE else "_" for c in name)
    bare = safe.rstrip(" .")  # trailing dots and spaces are dropped by FAT and NTFS, '.' and '..' are no names
    safe = bare + "_" * (bare != safe)
    cut = safe.encode("utf-8", "surrogateescape")[:MAX_BYTES].decode("utf-8", "ignore")
    return cut, cut != name


def output_names(keys: Sequence[str], what: str = "inputs") -> list[str]:
    """The file name (without extension) of each of ``keys``: the key's own, its folders joined by ``__``
    (``a/b/c.jpg`` -> ``a__b__c``); a name whose characters had to be replaced, that was cut short, or that another
    key shares on some filesystem (``a.jpg`` and ``a.png``, ``Cat`` and ``cat``) gets ``~`` and a hash of its key.

    Raises:
        InputError: two keys still share a name (the same key twice); nothing should be written then.
    """
    flat = [_flat(str(k)) for k in keys]
    shared = Counter(_fold(name) for name, _ in flat)
    names = [
        f"{name}~{_digest(str(k))}" if changed or shared[_fold(name)] > 1 else name for k, (name, changed) in zip(keys, flat, strict=True)
    ]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        j = seen.setdefault(_fold(name), i)
        if j != i:
            raise InputError(f"two {what}, {keys[j]} and {keys[i]}, would write one file ({name}); rename one, or give them one at a time")
    return names


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies inside ``folder`` (symbolic links followed; a path need not exist)."""
    return _resolved(folder) in _resolved(path).parents


def check_outside(out: str | Path, flag: str, folders: Iterable[tuple[str | Path, str]]) -> None:
    """Refuse ``out`` when it is one of ``folders`` or lies inside one (symbolic links followed).

    Args:
        folders: (folder, what it is, as the message names it: ``the RUN folder``, ``the input folder``).
    """
    for folder, what in folders:
        if _resolved(out) == _resolved(folder):
            raise InputError(f"{flag} {out} is {what}; write outside it")
        if inside(out, folder):
            raise InputError(f"{flag} {out} is inside {what} {folder}; write outside it")


class OwnedFolder:
    """An output folder a command owns, known by its marker file (``predict.json``, ``.fcache-report.json``): the
    marker, written before anything else, lists the entries the command writes there, and once they are written the
    sha256 of each that is a file. A rerun removes those entries and nothing else: a file changed since (by the user)
    is refused, not replaced; an entry without its sha256 (a folder, or one claimed by a run that stopped before it
    finished) is the command's whatever it holds. A folder without the marker must be new or empty, or one that
    ``legacy`` recognises (an earlier release's, which recorded nothing: ``legacy`` gives the entries it wrote).

    ``keep``: names in the folder that are the caller's own and never touched (a sweep's ``runs``); ``who`` names the
    writer in the message (``fcache report``)."""

    def __init__(
        self,
        path: str | Path,
        flag: str,
        marker: str,
        *,
        who: str = "fcache",
        keep: Iterable[str] = (),
        legacy: Callable[[Path], Iterable[str]] | None = None,
    ) -> None:
        self.path, self.flag, self.marker, self.who = Path(path), flag, marker, who
        self.keep, self.legacy = frozenset(keep), legacy

    def earlier(self) -> list[str]:
        """The entries an earlier run of the command wrote here; InputError when the folder holds anything else."""
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise InputError(f"{self.flag} {p} is not a folder; give a new or empty folder")
        present = sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        earlier_release = self.legacy(p) if self.legacy is not None and present else ()
        listed = self._listed() if self.marker in present else dict.fromkeys(earlier_release)
        own = {self.marker} if listed is not None else set()
        listed = listed or {}
        foreign = [
            name + ("" if name not in listed else " (changed since)")
            for name in present
            if name not in self.keep | own and not (name in listed and self._unchanged(name, listed[name]))
        ]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise InputError(f"{self.flag} {p} holds files {self.who} did not write ({shown}); give a new or empty folder")
        return [name for name in listed if name in present and name not in self.keep]

    def check(self) -> None:
        """Refuse a folder this command may not write into, before anything is written."""
        check_writable(self.path, self.flag)
        self.earlier()

    def claim(self, entries: Iterable[str], **record: Any) -> None:
        """Remove the earlier run's outputs, make the folder and write the marker listing ``entries`` (and ``record``),
        before any of them is written: a run that stops before :meth:`record` leaves a folder a rerun replaces."""
        for name in self.earlier():
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / self.marker, {**record, "entries": self._names(entries), "sha256": {}})

    def record(self, entries: Iterable[str], **record: Any) -> None:
        """Rewrite the marker once the run has written its outputs: those of ``entries`` it wrote, the sha256 of each
        that is a file, and whatever the command records of its run."""
        names = [n for n in self._names(entries) if (self.path / n).exists() or (self.path / n).is_symlink()]
        files = [n for n in names if (self.path / n).is_file() and not (self.path / n).is_symlink()]
        write_json(self.path / self.marker, {**record, "entries": names, "sha256": {n: digest(self.path / n) for n in files}})

    def _names(self, entries: Iterable[str]) -> list[str]:
        return sorted(set(entries) - self.keep - {self.marker})

    def _unchanged(self, name: str, sha: str | None) -> bool:
        entry = self.path / name
        return sha is None or (entry.is_file() and not entry.is_symlink() and digest(entry) == sha)

    def _listed(self) -> dict[str, str | None] | None:
        """The marker's entries (name -> sha256, None where it records none): plain names in this folder; None for a
        marker fcache did not write. Reads the marker of every release: ``entries`` without ``sha256``, and a report's
        name -> sha256 without ``entries``."""
        try:
            data = json.loads((self.path / self.marker).read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and "entries" not in data and all(isinstance(v, str) for v in data.values()):
            data = {"entries": list(data), "sha256": data}
        if (
            not isinstance(data, dict)
            or not isinstance(entries := data.get("entries"), list)
            or not isinstance(sha := data.get("sha256", {}), dict)
        ):
            return None
        plain = all(isinstance(e, str) and e not in ("", ".", "..") and "/" not in e for e in entries)
        hashes = all(isinstance(sha.get(e), (str, type(None))) for e in entries)
        return {e: sha.get(e) for e in entries} if plain and hashes else None


def digest(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
