"""Raw-dataset sources of ``fcache extract``: the SOURCES table (kind -> how to build it) and ``build_source``.

Every builder takes the whole :class:`fcache.spec.SourceConfig` (the extract flags of the dataset, recorded in the
manifest) and refuses the settings its kind does not use, with a message naming the fix. ``base.py`` holds the
Source protocol every kind implements. This module imports no source (nor torch): the table is what ``fcache
extract --help`` lists, and a source's module is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fcache.common.errors import InputError
from fcache.extract.sources.classes import read_classes
from fcache.spec import SourceConfig, Targets

if TYPE_CHECKING:
    from fcache.extract.sources.base import Source


@dataclass(frozen=True)
class SourceDef:
    """One kind of dataset: how to build its source from the config, and what it holds (for ``--help``)."""

    build: Callable[[SourceConfig], Source]
    help: str


def _existing(root: str | Path, what: str) -> Path:
    p = Path(root)
    if not p.exists():
        raise InputError(f"--root {p} does not exist; give the {what} folder")
    return p


def _no_annotations(c: SourceConfig) -> None:
    if c.annotations:
        raise InputError(f"--annotations is not used by --dataset {c.kind}; drop it (or choose coco / video)")
    _no_stuff(c)


def _no_stuff(c: SourceConfig) -> None:
    if c.stuff_root:
        raise InputError(f"--stuff-root is not used by --dataset {c.kind}; drop it (or choose coco)")


def _no_classes(c: SourceConfig) -> None:
    if c.classes:
        raise InputError(f"--classes is not used by --dataset {c.kind} (its classes come from the data); drop it")


def _coco(c: SourceConfig) -> Source:
    from fcache.extract.sources.coco import CocoSource

    _no_classes(c)
    if not c.annotations:
        raise InputError("--dataset coco needs --annotations PATH (the COCO json, e.g. annotations/instances_val2017.json)")
    if c.stuff_root and not Path(c.stuff_root).is_dir():
        raise InputError(f"--stuff-root {c.stuff_root} is not a folder; give the folder of COCO-stuff label PNGs or leave it out")
    return CocoSource(
        _existing(c.root, "COCO image"),
        c.annotations,
        max_pixels=c.max_pixels,
        drop_degenerate_boxes=c.drop_degenerate_boxes,
        stuff_root=c.stuff_root or None,
    )


def _ade20k(c: SourceConfig) -> Source:
    from fcache.extract.sources.ade20k import Ade20kSource

    _no_annotations(c)
    _no_classes(c)
    if not c.split:
        raise InputError("--dataset ade20k needs --split training or --split validation")
    return Ade20kSource(_existing(c.root, "ADEChallengeData2016"), c.split, max_pixels=c.max_pixels)


def _seg_folder(c: SourceConfig) -> Source:
    from fcache.extract.sources.segfolder import SegFolderSource, seg_folder_classes

    _no_annotations(c)
    root = _existing(c.root, "segmentation (images/ + masks/)")
    return SegFolderSource(root, seg_folder_classes(root, c.classes), split=c.split, ignore_index=c.ignore_index, max_pixels=c.max_pixels)


def _depth_folder(c: SourceConfig) -> Source:
    from fcache.extract.sources.depthfolder import DepthFolderSource

    _no_annotations(c)
    _no_classes(c)
    return DepthFolderSource(_existing(c.root, "depth (images/ + depth/)"), split=c.split, scale=c.depth_scale, max_pixels=c.max_pixels)


def _video(c: SourceConfig) -> Source:
    from fcache.extract.sources.video import VideoSource

    _no_stuff(c)
    if c.annotations and not Path(c.annotations).is_file():
        raise InputError(f"--annotations {c.annotations} does not exist; give a CSV of path,label rows or leave it out")
    root = _existing(c.root, "video")
    classes = read_classes(c.classes)
    return VideoSource(
        root, c.annotations or None, frames=c.frames, clips=c.clips, max_pixels=c.max_pixels, timeout_s=c.decode_timeout, classes=classes
    )


def _folder(c: SourceConfig) -> Source:
    from fcache.extract.sources.folder import FolderSource

    _no_annotations(c)
    return FolderSource(_existing(c.root, "image"), max_pixels=c.max_pixels, classes=read_classes(c.classes))


def _wds(c: SourceConfig) -> Source:
    from fcache.extract.sources.wds import WdsSource

    _no_annotations(c)
    if "{" not in str(c.root):
        _existing(c.root, "webdataset shard")
    return WdsSource(c.root, max_pixels=c.max_pixels, classes=read_classes(c.classes))


SOURCES: dict[str, SourceDef] = {
    "coco": SourceDef(_coco, "image folder + COCO json: boxes, polygons/RLE, categories"),
    "ade20k": SourceDef(_ade20k, "ADEChallengeData2016: images + 150-class label PNGs"),
    "seg-folder": SourceDef(_seg_folder, "images/ + masks/ (label PNGs) + classes.txt: any segmentation set"),
    "depth-folder": SourceDef(_depth_folder, "images/ + depth/ (16-bit PNGs, .npy in metres): any monocular depth set"),
    "video": SourceDef(_video, "a folder per class, or a path,label CSV; clips of frames"),
    "folder": SourceDef(_folder, "ImageFolder class folders, or a flat folder"),
    "wds": SourceDef(_wds, "webdataset .tar shards with an image + cls/json"),
}


def build_source(c: SourceConfig) -> Source:
    """The source of ``c.kind`` for its settings.

    Raises:
        InputError: an unknown kind, a setting the kind does not use, or a missing folder/file (what to do).
    """
    if c.kind not in SOURCES:
        raise InputError(f"--dataset {c.kind!r} is not a known source; choose one of {', '.join(SOURCES)}")
    if c.ignore_index != Targets.IGNORE and c.kind != "seg-folder":
        raise InputError(f"--ignore-index is not used by --dataset {c.kind} (its labels say what is unlabelled); drop it")
    if c.depth_scale and c.kind != "depth-folder":
        raise InputError(f"--depth-scale is not used by --dataset {c.kind} (only depth-folder reads depth maps); drop it")
    return SOURCES[c.kind].build(c)


__all__ = ["SOURCES", "SourceDef", "build_source"]
