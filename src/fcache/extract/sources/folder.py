"""The ``folder`` source: torchvision's ImageFolder layout (``root/<class>/**/<image>``) or a flat folder of images.

Classes are the sorted names of the sub-folders of ``--root`` (images found recursively inside each, following
symlinks, like ``torchvision.datasets.ImageFolder``); label = class index, task "classification". A root with images
only at its top level is a flat, unlabelled folder: label -1, task "", no targets. Extensions are matched
case-insensitively; hidden files and folders (``.name``) are skipped. Keys are POSIX paths relative to ``--root``,
in sorted order. Metadata problems (an empty class folder, images beside class folders, nothing found) are reported
together, like ImageFolder refuses empty classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fcache.common.errors import MetadataError
from fcache.extract.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image
from fcache.extract.sources.base import Decoded, LabelTargets, SampleRef


@dataclass(frozen=True)
class Listing:
    """What a class-folder layout holds: class names and (relative path, label) pairs, or the problems found."""

    classes: tuple[str, ...]
    files: tuple[tuple[str, int], ...]
    problems: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def list_class_folder(root: Path, extensions: tuple[str, ...], what: str, classes: tuple[str, ...] = ()) -> Listing:
    """List ``root/<class>/**/<file>`` (labelled) or ``root/<file>`` (flat, label -1) for the given extensions.

    With ``classes`` (``--classes``) labels are indices into it and a class without a folder (or with an empty one)
    is fine: a split may lack a class; a folder not in ``classes`` is a problem.
    """
    if not root.is_dir():
        return Listing((), (), (f"--root {root} is not a folder",))
    top = sorted(e.name for e in os.scandir(root) if e.is_file() and _wanted(e.name, extensions))
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    per_class = {name: _walk(root / name, extensions) for name in class_dirs}
    if not any(per_class.values()) and not classes:
        if not top:
            return Listing((), (), (f"no {what} found under {root} (extensions {', '.join(extensions)}, any case)",))
        return Listing((), tuple((name, -1) for name in top), ())
    if classes:
        problems = [f"class folder {name!r} is not one of --classes" for name in class_dirs if name not in classes and per_class[name]]
    else:
        problems = [f"class folder {name!r} holds no {what}" for name in class_dirs if not per_class[name]]
    if top:
        shown = ", ".join(top[:5]) + (" ..." if len(top) > 5 else "")
        problems.append(f"{len(top)} {what} lie beside the class folders ({shown}); move them into a class folder")
    names = classes or tuple(class_dirs)
    files = sorted((f"{name}/{rel}", names.index(name)) for name in class_dirs if name in names for rel in per_class[name])
    return Listing(names, tuple(files), tuple(problems))


def _wanted(name: str, extensions: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(extensions)


def _walk(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Paths (POSIX, relative to ``folder``) of the wanted files below it, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / f).as_posix() for f in filenames if _wanted(f, extensions)]
    return sorted(out)


class FolderSource(LabelTargets):
    """Images in class sub-folders (classification) or one flat folder (unlabelled)."""

    kind = "folder"

    def __init__(self, root: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, classes: tuple[str, ...] = ()) -> None:
        self.root = Path(os.path.abspath(root))
        self.max_pixels = max_pixels
        self.classes = classes
        self._listing: Listing | None = None

    def listing(self) -> Listing:
        if self._listing is None:
            self._listing = list_class_folder(self.root, IMAGE_EXTENSIONS, "images", self.classes)
        return self._listing

    @property
    def task(self) -> str:
        return "classification" if self.listing().labelled else ""

    def samples(self) -> list[SampleRef]:
        listing = self.listing()
        if listing.problems:
            raise MetadataError(f"folder {self.root}", list(listing.problems), hint="fix the folder layout")
        return [SampleRef(key=rel, path=str(self.root / rel), label=label) for rel, label in listing.files]

    def decode(self, ref: SampleRef) -> Decoded:
        return decode_image(ref.path, root=self.root, max_pixels=self.max_pixels)
