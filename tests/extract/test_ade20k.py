"""The ade20k source on an ADEChallengeData2016-style folder of real photos: reduce-zero-label, padding, EXIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus import encode, photo, with_exif_orientation

from fcache.common.errors import MetadataError
from fcache.extract.sources.ade20k import ADE20K_CLASSES, Ade20kSource
from fcache.extract.sources.base import SampleError
from fcache.spec import Status, Targets
from helpers import source_of

SPLIT = "training"


def label_for(h: int, w: int, seed: int) -> np.ndarray:
    """Values 0..151: 0 (other) and 151 (out of range) included, so both map to ignore."""
    lab = np.random.default_rng(seed).integers(0, 152, (h, w), dtype=np.uint8)
    lab[0, 0], lab[0, 1], lab[0, 2], lab[0, 3] = 0, 1, 150, 151
    return lab


def make_ade(root: Path, n: int = 4) -> dict[str, np.ndarray]:
    """root/images/training/ADE_train_<k>.jpg from different photos + label PNGs; returns key -> label values."""
    (root / "images" / SPLIT).mkdir(parents=True)
    (root / "annotations" / SPLIT).mkdir(parents=True)
    labels = {}
    for k in range(n):
        a = photo(k, 40 + 12 * k)
        name = f"ADE_train_{k:08d}"
        (root / "images" / SPLIT / f"{name}.jpg").write_bytes(encode(a, "JPEG"))
        labels[f"images/{SPLIT}/{name}.jpg"] = lab = label_for(*a.shape[:2], seed=k)
        (root / "annotations" / SPLIT / f"{name}.png").write_bytes(encode(lab, "PNG"))
    return labels


def test_lists_samples_and_pads_to_the_largest_label(tmp_path: Path) -> None:
    labels = make_ade(tmp_path)
    src = source_of("ade20k", tmp_path, split=SPLIT)
    assert isinstance(src, Ade20kSource) and src.task == "segmentation"
    refs = src.samples()
    assert [r.key for r in refs] == sorted(labels)
    hmax, wmax = max(v.shape[0] for v in labels.values()), max(v.shape[1] for v in labels.values())
    spec = src.target_specs()[Targets.SEGMENTATION]
    assert spec.shape == (hmax, wmax) and spec.dtype == "uint8" and spec.fill == 255
    assert src.label_names() == ADE20K_CLASSES and len(ADE20K_CLASSES) == 150
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag" and src.driver_targets(refs) == {}


def test_decode_reduces_zero_label_and_pads(tmp_path: Path) -> None:
    labels = make_ade(tmp_path)
    src = Ade20kSource(tmp_path, SPLIT)
    refs = src.samples()
    for ref in refs:
        d = src.decode(ref)
        raw = labels[ref.key]
        h, w = raw.shape
        seg = d.targets[Targets.SEGMENTATION]
        assert d.image.shape == (h, w, 3) and seg.shape == src.hw and seg.dtype == np.uint8
        expected = np.where((raw == 0) | (raw > 150), 255, raw.astype(int) - 1)
        np.testing.assert_array_equal(seg[:h, :w], expected)
        assert list(seg[0, :4]) == [255, 0, 149, 255]
        assert (seg[h:] == 255).all() and (seg[:, w:] == 255).all()


def test_exif_orientation_moves_image_and_label_together(tmp_path: Path) -> None:
    make_ade(tmp_path, n=1)
    a = photo(4, 48)  # china.jpg: wider than high
    h, w = a.shape[:2]
    a[:8, :8] = [255, 0, 0]  # a red block in the stored top-left corner...
    lab = np.full((h, w), 1, np.uint8)
    lab[:8, :8] = 5  # ...labelled class 4 (after reduce-zero-label) on the stored pixel grid
    (tmp_path / "images" / SPLIT / "ADE_train_rot.jpg").write_bytes(with_exif_orientation(a, 6, "JPEG"))
    (tmp_path / "annotations" / SPLIT / "ADE_train_rot.png").write_bytes(encode(lab, "PNG"))
    src = Ade20kSource(tmp_path, SPLIT)
    ref = next(r for r in src.samples() if "rot" in r.key)
    assert src.hw[0] >= w and src.hw[1] >= h  # the header-only listing knows the label will be turned
    d = src.decode(ref)
    seg = d.targets[Targets.SEGMENTATION]
    assert d.orientation == 6 and d.image.shape == (w, h, 3)
    assert (seg[:8, h - 8 : h] == 4).all() and (seg[:w, :h] != 255).all()  # upright: the corner went top-right
    assert d.image[:8, h - 8 : h, 0].mean() > 200 and d.image[:8, h - 8 : h, 1].mean() < 60  # and so did the red block


def test_size_mismatch_and_missing_labels(tmp_path: Path) -> None:
    make_ade(tmp_path, n=2)
    key = sorted((tmp_path / "annotations" / SPLIT).iterdir())[0]
    key.write_bytes(encode(np.ones((5, 7), np.uint8), "PNG"))
    src = Ade20kSource(tmp_path, SPLIT)
    with pytest.raises(SampleError) as e:
        src.decode(src.samples()[0])
    assert e.value.status == Status.SIZE_MISMATCH
    key.unlink()
    (tmp_path / "images" / SPLIT / "extra.jpg").write_bytes(encode(photo(0, 16), "JPEG"))
    with pytest.raises(MetadataError) as err:
        Ade20kSource(tmp_path, SPLIT).samples()
    assert len(err.value.problems) == 2 and all("no label map" in p for p in err.value.problems)


def test_split_must_exist(tmp_path: Path) -> None:
    make_ade(tmp_path, n=1)
    with pytest.raises(ValueError, match="splits found: training"):
        Ade20kSource(tmp_path, "validation").samples()
    with pytest.raises(ValueError, match="needs --split"):
        source_of("ade20k", tmp_path)
    with pytest.raises(ValueError, match="not used by --dataset ade20k"):
        source_of("ade20k", tmp_path, split=SPLIT, annotations="x.json")


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (its data is cut: only the header is read when listing and checking its size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_a_bad_label_costs_its_sample_not_the_dataset(tmp_path: Path) -> None:
    labels = make_ade(tmp_path)
    names = sorted(labels)
    ann = tmp_path / "annotations" / SPLIT
    (ann / f"{Path(names[0]).stem}.png").write_bytes(b"")  # 0 bytes
    (ann / f"{Path(names[1]).stem}.png").write_bytes(b"not a png at all")
    (ann / f"{Path(names[2]).stem}.png").write_bytes(png_header(12000, 12000))  # claims 144 M pixels
    src = Ade20kSource(tmp_path, SPLIT, max_pixels=10_000_000)
    refs = src.samples()  # listed, not refused
    assert [r.key for r in refs] == names
    kept = labels[names[3]]
    assert src.target_specs()[Targets.SEGMENTATION].shape == kept.shape  # sized by the sample that is kept, not 12000 x 12000
    statuses = []
    for ref in refs[:3]:
        with pytest.raises(SampleError) as e:
            src.decode(ref)
        statuses.append(e.value.status)
    assert statuses == [Status.EMPTY_FILE, Status.DECODE_ERROR, Status.TOO_LARGE]
    assert src.decode(refs[3]).targets[Targets.SEGMENTATION].shape == kept.shape
