"""The ``seg-folder`` source: any semantic segmentation set as ``images/`` + ``masks/`` + a class list.

``--root`` holds ``images/<name>.<ext>`` and ``masks/<name>.png`` (with ``--split S``: ``images/S/`` and ``masks/S/``,
mmsegmentation's ``img_dir``/``ann_dir`` layout), and ``classes.txt`` (one class name per line, in label order) unless
``--classes`` names them; the one class list at the root serves every split, so a split without some class keeps the
others' labels. A mask is a single-channel PNG (a palette PNG is read as its indices) whose value k < N is class k of
the N classes and whose value ``--ignore-index`` (default 255) marks unlabelled pixels; both become the store's
``segmentation`` target (class indices, 255 = ignore). Any other value refuses its sample (``decode_error``, naming the
values): it means the class list and the masks disagree, which no mapping repairs silently. An image without its mask,
a mask without its image and two images of one name are metadata problems, reported together before any backbone work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcache.common.errors import InputError
from fcache.extract.decode import DEFAULT_MAX_PIXELS
from fcache.extract.sources.base import SampleError, SampleRef
from fcache.extract.sources.classes import read_classes
from fcache.extract.sources.labelmap import LabelMapSource, check_split, split_folders
from fcache.spec import Status, Targets

CLASSES_FILE = "classes.txt"
MAX_CLASSES = Targets.IGNORE  # label maps are stored as uint8 with 255 = ignore: classes 0..254


def seg_folder_classes(root: Path, classes: str) -> tuple[str, ...]:
    """The class names of ``--classes``, else of ``ROOT/classes.txt``; InputError naming both when neither is there."""
    if classes:
        return read_classes(classes)
    path = root / CLASSES_FILE
    if not path.is_file():
        raise InputError(f"--dataset seg-folder needs its class names: {path} (one name per line, in label order) or --classes a,b,c")
    return read_classes(str(path))


class SegFolderSource(LabelMapSource):
    """Images + label-index PNG masks + a class list; target ``segmentation`` written by workers."""

    kind = "seg-folder"
    labels_name = "mask"
    strict_pairs = True

    def __init__(
        self, root: str | Path, classes: tuple[str, ...], *, split: str = "", ignore_index: int = 255, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        super().__init__(root, max_pixels=max_pixels)
        if len(classes) > MAX_CLASSES:
            raise InputError(
                f"--dataset seg-folder takes at most {MAX_CLASSES} classes (label maps are uint8, 255 = ignore), not {len(classes)}"
            )
        if ignore_index < len(classes):
            raise InputError(
                f"--ignore-index {ignore_index} is class {ignore_index} ({classes[ignore_index]!r}) of the {len(classes)} classes; "
                f"give the mask value of unlabelled pixels, at least {len(classes)} (default 255)"
            )
        check_split(split, "masks")
        self.classes, self.split, self.ignore_index = classes, split, ignore_index

    def folders(self) -> tuple[Path, Path]:
        return split_folders(self.root, self.split, "masks", "images/<name>.<ext> + masks/<name>.png")

    def label_names(self) -> tuple[str, ...]:
        return self.classes

    def to_target(self, values: np.ndarray, ref: SampleRef) -> np.ndarray:
        v = values.astype(np.int64)
        n, ignore = len(self.classes), self.ignore_index
        bad = ((v < 0) | (v >= n)) & (v != ignore)
        if bad.any():
            odd = np.unique(v[bad])
            shown = ", ".join(map(str, odd[:5])) + (", ..." if len(odd) > 5 else "")
            raise SampleError(
                Status.DECODE_ERROR,
                f"{ref.extra['label']}: mask values {shown} are neither a class (0..{n - 1}) nor --ignore-index {ignore}; "
                "fix the class list or the mask",
            )
        return np.where(v == ignore, Targets.IGNORE, v).astype(np.uint8)
