"""The video source: a folder per class or a path,label CSV; labels, validation, decoding through the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus import frame_ids, video

from fcache.common.errors import MetadataError
from fcache.extract.decode import clip_indices
from fcache.extract.sources.base import SampleError
from fcache.extract.sources.video import VideoSource
from fcache.spec import Status, Targets
from helpers import source_of


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<class>/<video>: two classes, three clips (one nested, one upper-case extension), plus a corrupt one."""
    root = tmp_path_factory.mktemp("kinetics")
    for rel in ("juggling/b.mp4", "abseiling/a.mkv", "juggling/more/c.MP4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        video(root / rel, n=12)
    (root / "juggling" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (root / "juggling" / "readme.txt").write_text("not a video")
    return root


def test_folder_per_class(kinetics: Path) -> None:
    src = source_of("video", kinetics, frames=4, clips=2)
    assert isinstance(src, VideoSource) and src.task == "video"
    refs = src.samples()
    assert [(r.key, r.label) for r in refs] == [
        ("abseiling/a.mkv", 0), ("juggling/b.mp4", 1), ("juggling/bad.mp4", 1), ("juggling/more/c.MP4", 1),
    ]  # fmt: skip
    assert src.label_names() == ("abseiling", "juggling")
    np.testing.assert_array_equal(src.driver_targets(refs)[Targets.LABEL], [0, 1, 1, 1])
    d = src.decode(refs[1])
    assert d.frames.shape == (8, 64, 64, 3) and frame_ids(d.frames) == list(clip_indices(12, 4, 2))
    with pytest.raises(SampleError) as e:
        src.decode(refs[2])
    assert e.value.status == Status.DECODE_ERROR  # unreadable containers fail at decode time, not in samples()


def test_csv_with_header_and_class_names(kinetics: Path, tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("Path,Label\njuggling/b.mp4,juggling\n\nabseiling/a.mkv, abseiling\n../outside.mp4,juggling\n")
    src = VideoSource(kinetics, csv, frames=2)
    refs = src.samples()
    assert [(r.key, r.label) for r in refs] == [("juggling/b.mp4", 1), ("abseiling/a.mkv", 0), ("../outside.mp4", 1)]  # CSV order
    assert src.label_names() == ("abseiling", "juggling")
    with pytest.raises(SampleError) as e:
        src.decode(refs[2])
    assert e.value.status == Status.OUTSIDE_ROOT
    assert src.decode(refs[1]).frames.shape == (2, 64, 64, 3)


def test_csv_with_integer_labels_and_no_header(kinetics: Path, tmp_path: Path) -> None:
    csv = tmp_path / "val.csv"
    csv.write_text("juggling/b.mp4,3\nabseiling/a.mkv,0\n")
    src = source_of("video", kinetics, annotations=csv, frames=2)
    assert [r.label for r in src.samples()] == [3, 0]
    assert src.label_names() == ("0", "1", "2", "3")


def test_csv_problems_are_reported_together(kinetics: Path, tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("juggling/b.mp4,juggling\njuggling/b.mp4,juggling\nmissing.mp4,juggling\nno-label-here\n")
    with pytest.raises(MetadataError) as e:
        VideoSource(kinetics, csv, frames=2).samples()
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert "line 4: expected 'path,label'" in problems[0]
    assert "line 2: juggling/b.mp4 is already listed on line 1" in problems[1]
    assert "line 3: missing.mp4 does not exist" in problems[2]
    (tmp_path / "neg.csv").write_text("juggling/b.mp4,-1\n")
    with pytest.raises(MetadataError, match="label -1 is negative"):
        VideoSource(kinetics, tmp_path / "neg.csv", frames=2).samples()


def test_flags_are_checked(kinetics: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--annotations .* does not exist"):
        source_of("video", kinetics, annotations=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="at least 1"):
        VideoSource(kinetics, frames=0)


def test_labels_are_bounded_by_the_class_list(kinetics: Path, tmp_path: Path) -> None:
    """A label of 300000000 is a metadata problem naming its row, never 300 million class names."""
    (tmp_path / "huge.csv").write_text("juggling/b.mp4,300000000\nabseiling/a.mkv,0\n")
    with pytest.raises(MetadataError, match="line 1: label 300000000 is beyond the 100,000 classes fcache accepts without --classes"):
        VideoSource(kinetics, tmp_path / "huge.csv", frames=2).samples()
    (tmp_path / "two.csv").write_text("juggling/b.mp4,1\nabseiling/a.mkv,2\n")
    with pytest.raises(MetadataError, match="line 2: label 2 is beyond the 2 classes of --classes"):
        source_of("video", kinetics, annotations=tmp_path / "two.csv", classes="abseiling,juggling").samples()
    named = source_of("video", kinetics, annotations=tmp_path / "two.csv", classes="x,y,z")  # indices into --classes
    assert named.label_names() == ("x", "y", "z") and [r.label for r in named.samples()] == [1, 2]
