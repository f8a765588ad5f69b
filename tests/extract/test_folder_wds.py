"""The folder (ImageFolder / flat) and wds (webdataset tar shards) sources: keys, labels, targets, refusals."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from corpus import encode, photo

from fcache.common.errors import MetadataError
from fcache.extract.sources import SOURCES
from fcache.extract.sources.base import SampleError
from fcache.extract.sources.folder import FolderSource
from fcache.extract.sources.wds import WdsSource
from fcache.spec import Status, Targets
from helpers import source_of

JPEG = encode(photo(0, 24), "JPEG")
PNG = encode(photo(1, 20), "PNG")


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_image_folder_layout(tmp_path: Path) -> None:
    put(tmp_path / "dogs" / "b.jpg", JPEG)
    put(tmp_path / "dogs" / "puppies" / "a.PNG", PNG)  # nested, upper-case extension
    put(tmp_path / "cats" / "z.webp", encode(photo(2, 16), "WEBP"))
    put(tmp_path / "cats" / "notes.txt", b"not an image")
    put(tmp_path / "cats" / ".hidden.jpg", JPEG)
    put(tmp_path / ".git" / "x.jpg", JPEG)
    src = source_of("folder", tmp_path)
    assert isinstance(src, FolderSource) and src.task == "classification"
    refs = src.samples()
    assert [(r.key, r.label) for r in refs] == [("cats/z.webp", 0), ("dogs/b.jpg", 1), ("dogs/puppies/a.PNG", 1)]
    assert src.label_names() == ("cats", "dogs")
    assert src.target_specs()[Targets.LABEL].dtype == "int64"
    np.testing.assert_array_equal(src.driver_targets(refs)[Targets.LABEL], [0, 1, 1])
    assert src.decode(refs[2]).image.shape == (*photo(1, 20).shape[:2], 3)


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    put(tmp_path / "b.JPEG", JPEG)
    put(tmp_path / "a.png", PNG)
    src = FolderSource(tmp_path)
    refs = src.samples()
    assert [(r.key, r.label) for r in refs] == [("a.png", -1), ("b.JPEG", -1)]
    assert src.task == "" and src.label_names() == () and src.target_specs() == {} and src.driver_targets(refs) == {}


def test_folder_problems_are_reported_together(tmp_path: Path) -> None:
    put(tmp_path / "cats" / "a.jpg", JPEG)
    (tmp_path / "dogs").mkdir()
    put(tmp_path / "stray.jpg", JPEG)
    with pytest.raises(MetadataError) as e:
        FolderSource(tmp_path).samples()
    assert len(e.value.problems) == 2
    assert "'dogs' holds no images" in e.value.problems[0] and "stray.jpg" in e.value.problems[1]
    with pytest.raises(MetadataError, match="no images found"):
        FolderSource(tmp_path / "dogs").samples()
    with pytest.raises(ValueError, match="not used by --dataset folder"):
        source_of("folder", tmp_path, annotations="a.json")


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_wds_shards_list_keys_labels_and_json(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-000.tar", [
        {"__key__": "s0", "jpg": JPEG, "cls": 2, "json": {"caption": "a"}},
        {"__key__": "dir/s1", "png": PNG, "cls": 0},
    ])  # fmt: skip
    write_shard(tmp_path / "shard-001.tar", [{"__key__": "s2", "jpg": JPEG, "json": {"caption": "c"}}])
    for root in (tmp_path, tmp_path / "shard-{000..001}.tar"):
        src = source_of("wds", root)
        assert isinstance(src, WdsSource) and src.task == "classification"
        refs = src.samples()
        assert [(r.key, r.label) for r in refs] == [("shard-000.tar/s0", 2), ("shard-000.tar/dir/s1", 0), ("shard-001.tar/s2", -1)]
        assert src.label_names() == ("0", "1", "2")
        t = src.driver_targets(refs)
        np.testing.assert_array_equal(t[Targets.LABEL], [2, 0, -1])
        assert [json.loads(x) if x else None for x in t[Targets.IMAGE]] == [{"caption": "a"}, None, {"caption": "c"}]
        assert set(src.target_specs()) == {Targets.LABEL, Targets.IMAGE}
        assert src.decode(refs[1]).image.shape == (*photo(1, 20).shape[:2], 3)
        np.testing.assert_array_equal(src.decode(refs[0]).image, src.decode(refs[2]).image)


def add_member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (0 if link else len(data)), kind, link
    tar.addfile(info, None if link else io.BytesIO(data))


def test_wds_refuses_escaping_names_and_reports_bad_members(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        add_member(tar, "../../escape.jpg", JPEG)
        add_member(tar, "ok.jpg", JPEG)
        add_member(tar, "link.jpg", b"", tarfile.SYMTYPE, link="/etc/passwd")  # never followed: no image -> ignored
        add_member(tar, "broken.jpg", b"\xff\xd8garbage")
        add_member(tar, "empty.png", b"")
    src = WdsSource(tmp_path)
    refs = {r.key: r for r in src.samples()}
    assert sorted(refs) == ["evil.tar/../../escape", "evil.tar/broken", "evil.tar/empty", "evil.tar/ok"]
    assert src.task == "" and src.target_specs() == {}
    for key, status in [("../../escape", Status.OUTSIDE_ROOT), ("broken", Status.DECODE_ERROR), ("empty", Status.EMPTY_FILE)]:
        with pytest.raises(SampleError) as e:
            src.decode(refs[f"evil.tar/{key}"])
        assert e.value.status == status, key
    assert src.decode(refs["evil.tar/ok"]).image.dtype == np.uint8

    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        add_member(tar, "a.cls", b"cat")  # no image, and not an integer
        add_member(tar, "b.jpg", JPEG)
        add_member(tar, "b.json", b"{oops")
    (tmp_path / "zipped.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(MetadataError) as err:
        WdsSource(tmp_path).samples()
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert "bad.tar/a.cls: 'cat' is not a class index" in problems[0] and "bad.tar/a: no image member" in problems[1]
    assert "bad.tar/b.json: not valid JSON" in problems[2] and "zipped.tar: not a readable uncompressed tar" in problems[3]


def test_build_source_table(tmp_path: Path) -> None:
    assert set(SOURCES) == {"coco", "ade20k", "seg-folder", "depth-folder", "video", "folder", "wds"}
    with pytest.raises(ValueError, match="choose one of coco, ade20k, seg-folder, depth-folder, video, folder, wds"):
        source_of("imagenet", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        source_of("folder", tmp_path / "missing")
    with pytest.raises(MetadataError, match=r"no \*.tar shards"):
        source_of("wds", tmp_path).samples()


def test_wds_labels_are_bounded_and_classes_can_be_given(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-000.tar", [{"__key__": "s0", "jpg": JPEG, "cls": 300000000}, {"__key__": "s1", "jpg": JPEG, "cls": 1}])
    with pytest.raises(MetadataError, match=r"s0\.cls: label 300000000 is beyond the 100,000 classes"):
        source_of("wds", tmp_path).samples()
    with pytest.raises(MetadataError, match=r"s0\.cls: label 300000000 is beyond the 3 classes of --classes"):
        source_of("wds", tmp_path, classes="a,b,c").samples()


def test_folder_classes_make_splits_agree(tmp_path: Path) -> None:
    """A split without one of the classes keeps the others' labels when --classes names them all."""
    for split, present in (("train", ("cats", "dogs", "owls")), ("val", ("cats", "owls"))):
        for name in present:
            put(tmp_path / split / name / "a.png", PNG)
    train, val = (source_of("folder", tmp_path / s, classes="cats,dogs,owls") for s in ("train", "val"))
    assert train.label_names() == val.label_names() == ("cats", "dogs", "owls")
    assert [r.label for r in val.samples()] == [0, 2]
    (tmp_path / "classes.txt").write_text("cats\ndogs\nowls\n")
    assert source_of("folder", tmp_path / "val", classes=str(tmp_path / "classes.txt")).label_names() == ("cats", "dogs", "owls")
    with pytest.raises(MetadataError, match="class folder 'owls' is not one of --classes"):
        source_of("folder", tmp_path / "train", classes="cats,dogs").samples()
    with pytest.raises(MetadataError, match="class folder 'dogs' holds no images"):  # without --classes an empty class is refused
        (tmp_path / "val" / "dogs").mkdir()
        source_of("folder", tmp_path / "val").samples()


def test_a_shard_cut_inside_its_last_member_truncates_that_sample_only(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-000.tar", [{"__key__": f"s{k}", "jpg": JPEG, "cls": k} for k in range(3)])
    data = (tmp_path / "shard-000.tar").read_bytes()
    src = source_of("wds", tmp_path)
    last = src.samples()[-1].extra
    (tmp_path / "shard-000.tar").write_bytes(data[: last["offset"] + last["size"] // 2])  # a copy that stopped
    src = source_of("wds", tmp_path)
    refs = src.samples()  # listed, not refused
    assert [r.key for r in refs] == [f"shard-000.tar/s{k}" for k in range(3)]
    assert src.decode(refs[0]).image is not None and src.decode(refs[1]).image is not None
    with pytest.raises(SampleError) as e:
        src.decode(refs[2])
    assert e.value.status == Status.TRUNCATED
