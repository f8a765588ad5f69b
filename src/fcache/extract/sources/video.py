"""The ``video`` source: Kinetics-style clips, as a folder per class or a CSV of ``path,label``; decoded with PyAV.

Folder layout: ``--root/<class>/**/<video>`` (classes = sorted folder names, as ImageFolder; a root with videos only
at its top level is unlabelled, label -1). CSV layout (``--annotations``): one ``path,label`` row per video, paths
relative to ``--root``; an optional first row ``path,label`` (any case) is a header; blank rows are skipped. Labels
that are all integers are class indices (label names "0".."K-1", K = largest + 1); otherwise they are class names,
indexed in sorted order. Missing files, duplicate paths and malformed rows are reported together before any backbone
work; unreadable containers are not probed there (one bad video must not stop a run): they get DECODE_ERROR when
decoded. Each sample is ``clips`` clips of ``frames`` frames (see ``fcache.extract.decode.decode_video``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from fcache.common.errors import InputError, MetadataError
from fcache.extract.decode import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT_S, VIDEO_EXTENSIONS, decode_video
from fcache.extract.sources.base import Decoded, LabelTargets, SampleRef
from fcache.extract.sources.classes import index_of
from fcache.extract.sources.folder import Listing, list_class_folder

log = logging.getLogger(__name__)
_INT = re.compile(r"[+-]?\d+")


def read_label_csv(path: Path, root: Path, given: tuple[str, ...] = ()) -> Listing:
    """Parse a ``path,label`` CSV into a Listing (paths relative to ``root``), collecting every problem."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--annotations {path}: cannot read the CSV ({e}); give a CSV of path,label rows") from None
    if rows and [c.lower() for c in rows[0][1]] == ["path", "label"]:
        rows = rows[1:]
    problems = [f"line {n}: expected 'path,label', got {','.join(cells)!r}" for n, cells in rows if len(cells) != 2 or not all(cells)]
    good = [(n, cells[0], cells[1]) for n, cells in rows if len(cells) == 2 and all(cells)]
    if not rows:
        problems.append("the CSV lists no video")
    labels = [label for _, _, label in good]
    integers = bool(labels) and all(_INT.fullmatch(v) for v in labels)  # class indices; else names, sorted
    names = given or (() if integers else tuple(sorted(set(labels))))
    seen: dict[str, int] = {}
    files = []
    for n, name, label in good:
        k = index_of(label, names, f"line {n}", problems)
        full = os.path.normpath(os.path.join(root, name))
        inside = full.startswith(str(root) + os.sep)
        key = Path(full).relative_to(root).as_posix() if inside else name
        if key in seen:
            problems.append(f"line {n}: {name} is already listed on line {seen[key]}")
            continue
        seen[key] = n
        if inside and not os.path.isfile(full):
            problems.append(f"line {n}: {name} does not exist under {root}")
        files.append((key, k))
    classes = names or tuple(str(i) for i in range(max((k for _, k in files), default=-1) + 1))  # indices: "0".."K-1"
    return Listing(classes, tuple(files), tuple(problems))


class VideoSource(LabelTargets):
    """Videos with a class label each; ``decode`` samples clips of frames with PyAV."""

    kind = "video"
    task = "video"

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path | None = None,
        *,
        frames: int,
        clips: int = 1,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        classes: tuple[str, ...] = (),
    ) -> None:
        if frames < 1 or clips < 1:
            raise InputError(f"--frames {frames} --clips {clips}: both must be at least 1")
        self.root = Path(os.path.abspath(root))
        self.annotations = Path(annotations) if annotations else None
        self.frames, self.clips = frames, clips
        self.max_frames, self.max_pixels, self.timeout_s = max_frames, max_pixels, timeout_s
        self.classes = classes
        self._listing: Listing | None = None

    def listing(self) -> Listing:
        if self._listing is None:
            if self.annotations is not None:
                self._listing = read_label_csv(self.annotations, self.root, self.classes)
            else:
                self._listing = list_class_folder(self.root, VIDEO_EXTENSIONS, "videos", self.classes)
        return self._listing

    def samples(self) -> list[SampleRef]:
        listing = self.listing()
        if listing.problems:
            where = self.annotations or self.root
            raise MetadataError(f"video {where}", list(listing.problems), hint="fix the CSV or the folder layout")
        refs = [SampleRef(key=key, path=os.path.normpath(os.path.join(self.root, key)), label=label) for key, label in listing.files]
        outside = [r.key for r in refs if not r.path.startswith(str(self.root) + os.sep)]
        if outside:
            log.warning("video: %d path(s) escape --root and will be refused (e.g. %s)", len(outside), outside[0])
        return refs

    def decode(self, ref: SampleRef) -> Decoded:
        return decode_video(
            ref.path,
            frames=self.frames,
            clips=self.clips,
            root=self.root,
            max_frames=self.max_frames,
            max_pixels=self.max_pixels,
            timeout_s=self.timeout_s,
        )
