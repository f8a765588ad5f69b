"""The ``wds`` source: webdataset tar shards (https://github.com/webdataset/webdataset) with an image + json/cls.

``--root`` is a folder of ``*.tar`` shards or a brace pattern (``/data/shard-{000..099}.tar``). Members are grouped
into samples as webdataset does (``webdataset.tariterators.base_plus_ext``: the key is the member path up to the
first dot of its file name, the rest its extension, lower-cased). Each sample needs one image member (jpg, jpeg,
png, webp, bmp, gif, tif, tiff, ppm: the first present in that order); ``cls`` (an integer) becomes ``label``;
``json`` (valid JSON) is stored verbatim as the ``image`` target. Key = ``<shard path relative to the shard folder>/
<sample key>``; samples keep shard order, then member order.

Shards are read with the stdlib ``tarfile``, uncompressed only (members are read later by offset): nothing is
extracted to disk, links and special members are ignored, and a member name that is absolute or contains ``..``
makes its sample OUTSIDE_ROOT. Images are decoded from bytes (``decode_image_bytes``). Labels are class indices:
label names are "0".."K-1" with K = largest label + 1.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import braceexpand
import numpy as np
from webdataset.tariterators import base_plus_ext

from fcache.common.errors import MetadataError
from fcache.extract.decode import DEFAULT_MAX_PIXELS, MAX_FILE_BYTES, decode_image_bytes
from fcache.extract.sources.base import Decoded, SampleError, SampleRef
from fcache.extract.sources.classes import index_of
from fcache.spec import Status, Targets
from fcache.store import TargetSpec

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
log = logging.getLogger(__name__)
MAX_META_BYTES = 16 << 20  # a json/cls member larger than this is a metadata problem, never read into memory


@dataclass
class _Sample:
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # extension -> member
    outside: str = ""  # a member name escaping the shard


def shard_paths(root: str | Path) -> tuple[Path, list[Path]]:
    """(the folder keys are relative to, the shards in order) for a folder of *.tar or a brace pattern."""
    p = Path(root)
    if p.is_dir():
        return p.absolute(), sorted(q.absolute() for q in p.iterdir() if q.is_file() and q.name.endswith(".tar"))
    shards = [Path(s).absolute() for s in braceexpand.braceexpand(str(root))]
    base = Path(os.path.commonpath([s.parent for s in shards])) if shards else p.parent.absolute()
    return base, shards


def _escapes(name: str) -> bool:
    pure = PurePosixPath(name)
    return pure.is_absolute() or ".." in pure.parts


def _group(tar: tarfile.TarFile, problems: list[str], shard: str) -> dict[str, _Sample]:
    """Regular-file members grouped by webdataset key, in member order.

    A shard cut short (a copy that stopped) keeps the members listed before the cut; the member the cut falls in
    reads short at decode, so its sample gets ``truncated`` and the others are extracted.
    """
    samples: dict[str, _Sample] = {}
    for member in _members(tar, shard):
        if not member.isfile():
            continue  # folders, links and devices are never followed
        key, ext = base_plus_ext(member.name)
        if key is None or ext is None:
            continue
        sample = samples.setdefault(key, _Sample())
        ext = ext.lower()
        if ext in sample.members:
            problems.append(f"{shard}: member {member.name} appears twice in sample {key}")
        sample.members[ext] = member
        if _escapes(member.name):
            sample.outside = member.name
    return samples


def _members(tar: tarfile.TarFile, shard: str) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except tarfile.ReadError as e:  # the shard ends inside a member: keep what came before
        log.warning("wds: %s ends early (%s); its last sample will be truncated", shard, e)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # regular files only
    return f.read()


class WdsSource:
    """Samples from webdataset tar shards; images decoded from the tar bytes."""

    kind = "wds"

    def __init__(self, root: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, classes: tuple[str, ...] = ()) -> None:
        self.pattern = str(root)
        self.root, self.shards = shard_paths(root)
        self.max_pixels = max_pixels
        self.classes = classes
        self._listed: tuple[list[SampleRef], dict[str, str]] | None = None  # refs, key -> json text

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_listed": None}

    def _list(self) -> tuple[list[SampleRef], dict[str, str]]:
        if self._listed is not None:
            return self._listed
        problems: list[str] = [] if self.shards else [f"no *.tar shards at {self.pattern}"]
        refs: list[SampleRef] = []
        texts: dict[str, str] = {}
        for shard in self.shards:
            rel = shard.relative_to(self.root).as_posix()
            if not shard.is_file():
                problems.append(f"{shard}: no such shard")
                continue
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    for key, sample in _group(tar, problems, rel).items():
                        ref = self._ref(tar, shard, f"{rel}/{key}", sample, problems, texts)
                        refs += [ref] if ref is not None else []
            except (OSError, tarfile.TarError) as e:
                problems.append(f"{rel}: not a readable uncompressed tar ({e})")
        if problems:
            raise MetadataError(
                f"wds {self.pattern}",
                problems,
                hint="--root takes a folder of uncompressed .tar shards or a brace pattern; fix or remove the listed shards",
            )
        self._listed = (refs, texts)
        return self._listed

    def _ref(
        self, tar: tarfile.TarFile, shard: Path, key: str, sample: _Sample, problems: list[str], texts: dict[str, str]
    ) -> SampleRef | None:
        label = -1
        for ext in ("cls", "json"):
            member = sample.members.get(ext)
            if member is None or sample.outside:
                continue
            if member.size > MAX_META_BYTES:
                problems.append(f"{key}.{ext}: {member.size} bytes, more than {MAX_META_BYTES}")
                continue
            text = _read(tar, member).decode("utf-8", errors="replace").strip()
            if ext == "cls":
                label = index_of(text, self.classes, f"{key}.cls", problems)
                continue
            try:
                json.loads(text)
                texts[key] = text
            except json.JSONDecodeError as e:
                problems.append(f"{key}.json: not valid JSON ({e})")
        image = next((sample.members[e] for e in IMAGE_MEMBERS if e in sample.members), None)
        if image is None:
            problems.append(f"{key}: no image member ({', '.join(IMAGE_MEMBERS)})")
            return None
        extra = {"shard": str(shard), "member": image.name, "offset": image.offset_data, "size": image.size, "outside": sample.outside}
        return SampleRef(key=key, path="", label=label, extra=extra)

    def samples(self) -> list[SampleRef]:
        return self._list()[0]

    def _has(self) -> tuple[bool, bool]:
        refs, texts = self._list()
        return any(r.label >= 0 for r in refs), bool(texts)

    @property
    def task(self) -> str:
        return "classification" if self._has()[0] else ""

    def label_names(self) -> tuple[str, ...]:
        if self.classes:
            return self.classes
        refs = self._list()[0]
        top = max((r.label for r in refs), default=-1)
        return tuple(str(i) for i in range(top + 1))

    def target_specs(self) -> dict[str, TargetSpec]:
        labels, texts = self._has()
        specs = {Targets.LABEL: TargetSpec("int64", (), fill=-1)} if labels else {}
        return specs | ({Targets.IMAGE: TargetSpec("str", (), fill="")} if texts else {})

    def target_attrs(self) -> dict[str, Any]:
        return {}

    def driver_targets(self, refs: list[SampleRef]) -> dict[str, np.ndarray]:
        labels, has_text = self._has()
        texts = self._list()[1]
        out = {Targets.LABEL: np.array([r.label for r in refs], dtype=np.int64)} if labels else {}
        if has_text:
            out[Targets.IMAGE] = np.array([texts.get(r.key, "") for r in refs], dtype=object)
        return out

    def decode(self, ref: SampleRef) -> Decoded:
        x = ref.extra
        if x["outside"]:
            raise SampleError(Status.OUTSIDE_ROOT, f"{ref.key}: tar member {x['outside']!r} is absolute or contains '..'; refused")
        if x["size"] == 0:
            raise SampleError(Status.EMPTY_FILE, f"{ref.key}: image member {x['member']} is empty (0 bytes)")
        if x["size"] > MAX_FILE_BYTES:
            raise SampleError(Status.TOO_LARGE, f"{ref.key}: image member {x['member']} has {x['size']} bytes, more than {MAX_FILE_BYTES}")
        try:
            with open(x["shard"], "rb") as f:
                f.seek(x["offset"])
                data = f.read(x["size"])
        except OSError as e:
            raise SampleError(Status.DECODE_ERROR, f"{ref.key}: cannot read shard {x['shard']} ({e.strerror or e})") from None
        if len(data) < x["size"]:
            raise SampleError(Status.TRUNCATED, f"{ref.key}: shard {x['shard']} ends inside member {x['member']}")
        return decode_image_bytes(data, name=f"{ref.key} ({x['member']})", max_pixels=self.max_pixels)
