"""Raw-dataset sources of ``fcache extract``: the SOURCES table (kind -> constructor) and ``build_source``.

Every constructor in SOURCES takes ``--root`` and the extract flags (``Flags``) and refuses the flags its kind does
not use, with a message naming the fix. ``base.py`` holds the Source protocol every kind implements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fcache.common.errors import InputError, MetadataError
from fcache.extract.decode import DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT_S
from fcache.extract.sources.ade20k import Ade20kSource
from fcache.extract.sources.base import Decoded, SampleError, SampleRef, Source
from fcache.extract.sources.coco import CocoSource
from fcache.extract.sources.folder import FolderSource
from fcache.extract.sources.video import VideoSource
from fcache.extract.sources.wds import WdsSource


@dataclass(frozen=True)
class Flags:
    """The extract flags a source may use (see ``build_source``)."""

    annotations: str | Path | None = None
    split: str = ""
    frames: int = 16
    clips: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_TIMEOUT_S
    drop_degenerate_boxes: bool = False


def _existing(root: str | Path, what: str) -> Path:
    p = Path(root)
    if not p.exists():
        raise InputError(f"--root {p} does not exist; give the {what} folder")
    return p


def _no_annotations(kind: str, f: Flags) -> None:
    if f.annotations:
        raise InputError(f"--annotations is not used by --dataset {kind}; drop it (or choose coco / video)")


def _coco(root: str | Path, f: Flags) -> Source:
    if not f.annotations:
        raise InputError("--dataset coco needs --annotations PATH (the COCO json, e.g. annotations/instances_val2017.json)")
    return CocoSource(_existing(root, "COCO image"), f.annotations, max_pixels=f.max_pixels, drop_degenerate_boxes=f.drop_degenerate_boxes)


def _ade20k(root: str | Path, f: Flags) -> Source:
    _no_annotations("ade20k", f)
    if not f.split:
        raise InputError("--dataset ade20k needs --split training or --split validation")
    return Ade20kSource(_existing(root, "ADEChallengeData2016"), f.split, max_pixels=f.max_pixels)


def _video(root: str | Path, f: Flags) -> Source:
    if f.annotations and not Path(f.annotations).is_file():
        raise InputError(f"--annotations {f.annotations} does not exist; give a CSV of path,label rows or leave it out")
    root = _existing(root, "video")
    return VideoSource(root, f.annotations or None, frames=f.frames, clips=f.clips, max_pixels=f.max_pixels, timeout_s=f.decode_timeout)


def _folder(root: str | Path, f: Flags) -> Source:
    _no_annotations("folder", f)
    return FolderSource(_existing(root, "image"), max_pixels=f.max_pixels)


def _wds(root: str | Path, f: Flags) -> Source:
    _no_annotations("wds", f)
    if "{" not in str(root):
        _existing(root, "webdataset shard")
    return WdsSource(root, max_pixels=f.max_pixels)


SOURCES: dict[str, Callable[[str | Path, Flags], Source]] = {
    "coco": _coco,
    "ade20k": _ade20k,
    "video": _video,
    "folder": _folder,
    "wds": _wds,
}


def build_source(
    kind: str,
    root: str | Path,
    *,
    annotations: str | Path | None = None,
    split: str = "",
    frames: int = 16,
    clips: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_timeout: float = DEFAULT_TIMEOUT_S,
    drop_degenerate_boxes: bool = False,
) -> Source:
    """The source of ``kind`` for the extract flags. Raises ValueError (what is wrong, what to do) for bad flags.

    Args:
        root: the dataset folder (wds: a folder of .tar shards or a brace pattern).
        annotations: COCO json (coco) or ``path,label`` CSV (video); refused by the other kinds.
        split: ADE20K split folder (``training`` / ``validation``); informative only for the other kinds.
        frames, clips: video sampling, T frames per clip (ignored by image kinds).
        max_pixels: images / video frames with more pixels are refused (TOO_LARGE).
        decode_timeout: seconds one video may take to decode (TIMEOUT).
        drop_degenerate_boxes: coco: drop boxes with w or h <= 0 with a logged warning instead of refusing the json.
    """
    if kind not in SOURCES:
        raise InputError(f"--dataset {kind!r} is not a known source; choose one of {', '.join(SOURCES)}")
    flags = Flags(annotations, split, frames, clips, max_pixels, decode_timeout, drop_degenerate_boxes)
    return SOURCES[kind](root, flags)


__all__ = ["SOURCES", "Decoded", "Flags", "MetadataError", "SampleError", "SampleRef", "Source", "build_source"]
