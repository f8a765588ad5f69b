"""Class lists of the labelled sources (folder, video, wds): given with ``--classes``, or found in the data.

``--classes`` is a comma-separated list of names or the path of a text file with one name per line; it fixes
the label order, so a training and a validation split agree even when a class is missing from one of them. Without
it, class folders are sorted by name and integer labels are class indices "0".."K-1". Integer labels are bounded by
the class list (or, without one, by ``MAX_CLASSES``), so a typo of 300000000 in a CSV is a metadata problem naming
its row, never 300 million class names.
"""

from __future__ import annotations

from pathlib import Path

from fcache.common.errors import InputError

MAX_CLASSES = 100_000  # integer labels without --classes must lie below this


def read_classes(spec: str) -> tuple[str, ...]:
    """The class names of ``--classes`` (a comma-separated list, or a file with one name per line); () when not given."""
    if not spec:
        return ()
    path = Path(spec)
    if _is_file(path):
        try:
            names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--classes {spec}: cannot read the file ({e}); give one class name per line") from None
    else:
        names = tuple(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise InputError(f"--classes {spec!r} names no class; give names separated by commas, or a file with one per line")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--classes names {', '.join(twice)} twice; give each class once")
    return names


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a long list of names is no file name (ENAMETOOLONG)
        return False


def index_of(label: str, classes: tuple[str, ...], where: str, problems: list[str]) -> int:
    """The class index of ``label`` (a name in ``classes``, or an integer index below the bound); -1 and a problem otherwise."""
    if label in classes:
        return classes.index(label)
    if label.startswith("-") and label[1:].isdigit():
        problems.append(f"{where}: label {label} is negative (class indices start at 0)")
        return -1
    if label.lstrip("+").isdigit():
        k, bound = int(label), len(classes) or MAX_CLASSES
        if k < bound:
            return k
        what = f"the {len(classes)} classes of --classes" if classes else f"the {MAX_CLASSES:,} classes fcache accepts without --classes"
        problems.append(f"{where}: label {k} is beyond {what}")
        return -1
    if classes:
        problems.append(
            f"{where}: label {label[:40]!r} is not one of --classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
        )
    else:
        problems.append(f"{where}: {label[:40]!r} is not a class index (an integer >= 0)")
    return -1
