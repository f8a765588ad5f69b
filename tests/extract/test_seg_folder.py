"""The seg-folder source: images/ + masks/ + classes.txt (or --classes), an ignore index, splits as sub-folders, palette
masks read as indices, values outside the class list refused per sample, mismatched names refused together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import encode, photo
from PIL import Image

from fcache.cli import main
from fcache.common.errors import InputError, MetadataError
from fcache.extract.sources.base import SampleError
from fcache.extract.sources.segfolder import SegFolderSource
from fcache.spec import Status, Targets
from helpers import refused, source_of

CLASSES = ("sky", "road", "car", "tree", "person")


def mask_for(h: int, w: int, seed: int, ignore: int = 255) -> np.ndarray:
    """Values 0..4 and ``ignore``, each present."""
    m = np.random.default_rng(seed).integers(0, len(CLASSES), (h, w)).astype(np.uint8)
    m[0, :6] = [0, 1, 2, 3, 4, ignore]
    return m


def palette_png(values: np.ndarray) -> bytes:
    im = Image.fromarray(values, mode="P")
    im.putpalette([c for k in range(256) for c in (k, 255 - k, (7 * k) % 256)])
    return encode(im, "PNG")


def make_seg_folder(root: Path, n: int = 3, *, split: str = "", ignore: int = 255, classes_txt: bool = True) -> dict[str, np.ndarray]:
    """root/images[/split]/img<k>.jpg + root/masks[/split]/img<k>.png (the last one a palette PNG); key -> mask values."""
    images, masks = root / "images" / split, root / "masks" / split
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    if classes_txt:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = {}
    for k in range(n):
        a = photo(k, 40 + 8 * k)
        (images / f"img{k}.jpg").write_bytes(encode(a, "JPEG"))
        m = mask_for(*a.shape[:2], seed=k, ignore=ignore)
        (masks / f"img{k}.png").write_bytes(palette_png(m) if k == n - 1 else encode(m, "PNG"))
        out[(Path("images") / split / f"img{k}.jpg").as_posix()] = m
    return out


def test_lists_decodes_and_maps_the_ignore_index(tmp_path: Path) -> None:
    masks = make_seg_folder(tmp_path, ignore=9)
    src = source_of("seg-folder", tmp_path, ignore_index=9)
    assert isinstance(src, SegFolderSource) and src.task == "segmentation" and src.label_names() == CLASSES
    refs = src.samples()
    assert [r.key for r in refs] == sorted(masks)
    hw = (max(m.shape[0] for m in masks.values()), max(m.shape[1] for m in masks.values()))
    spec = src.target_specs()[Targets.SEGMENTATION]
    assert spec.shape == hw and spec.dtype == "uint8" and spec.fill == 255
    assert Image.open(tmp_path / "masks" / "img2.png").mode == "P"  # the palette mask is read as its indices
    for ref in refs:
        seg = src.decode(ref).targets[Targets.SEGMENTATION]
        m = masks[ref.key]
        h, w = m.shape
        np.testing.assert_array_equal(seg[:h, :w], np.where(m == 9, 255, m))
        assert list(seg[0, :6]) == [0, 1, 2, 3, 4, 255] and (seg[h:] == 255).all() and (seg[:, w:] == 255).all()


def test_values_outside_the_classes_cost_their_sample(tmp_path: Path) -> None:
    make_seg_folder(tmp_path, n=2)
    bad = mask_for(*np.asarray(Image.open(tmp_path / "masks" / "img0.png")).shape, seed=0)
    bad[1, :3] = [5, 7, 200]
    (tmp_path / "masks" / "img0.png").write_bytes(encode(bad, "PNG"))
    (tmp_path / "masks" / "img1.png").write_bytes(b"")
    src = source_of("seg-folder", tmp_path)
    refs = src.samples()
    with pytest.raises(SampleError) as e:
        src.decode(refs[0])
    assert e.value.status == Status.DECODE_ERROR
    assert "mask values 5, 7, 200 are neither a class (0..4) nor --ignore-index 255" in str(e.value)
    with pytest.raises(SampleError) as e:
        src.decode(refs[1])
    assert e.value.status == Status.EMPTY_FILE


def test_classes_split_and_ignore_index_settings(tmp_path: Path) -> None:
    make_seg_folder(tmp_path, n=1, split="train", classes_txt=False)
    with pytest.raises(InputError, match="needs its class names: .*classes.txt .* or --classes"):
        source_of("seg-folder", tmp_path, split="train")
    assert source_of("seg-folder", tmp_path, split="train", classes="a,b,c,d,e").label_names() == tuple("abcde")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    src = source_of("seg-folder", tmp_path, split="train")
    assert [r.key for r in src.samples()] == ["images/train/img0.jpg"] and src.label_names() == CLASSES
    with pytest.raises(InputError, match=r"expected folders images and masks .* splits found: train \(--split NAME\)"):
        source_of("seg-folder", tmp_path).samples()
    with pytest.raises(InputError, match=r"--ignore-index 3 is class 3 \('tree'\) of the 5 classes"):
        source_of("seg-folder", tmp_path, split="train", ignore_index=3)
    with pytest.raises(InputError, match="must name a sub-folder of images/ and masks/"):
        source_of("seg-folder", tmp_path, split="../train")
    with pytest.raises(InputError, match="--ignore-index is not used by --dataset folder"):
        source_of("folder", tmp_path, ignore_index=0)
    with pytest.raises(InputError, match="at most 255 classes"):
        source_of("seg-folder", tmp_path, split="train", classes=",".join(f"c{k}" for k in range(256)))


def test_mismatched_names_are_refused_together(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_seg_folder(root, n=2)
    (root / "images" / "lonely.jpg").write_bytes(encode(photo(0, 16), "JPEG"))
    (root / "masks" / "orphan.png").write_bytes(encode(np.zeros((4, 4), np.uint8), "PNG"))
    (root / "images" / "img0.png").write_bytes(encode(photo(1, 16), "PNG"))
    with pytest.raises(MetadataError) as e:
        source_of("seg-folder", root).samples()
    problems = e.value.problems
    assert len(problems) == 3
    assert any("images/lonely.jpg: no mask masks/lonely.png" in p for p in problems)
    assert any("1 mask(s) in masks have no image (orphan.png)" in p for p in problems)
    assert any("share the name 'img0'" in p for p in problems)
    out = tmp_path / "s.zarr"
    args = ["extract", "--dataset", "seg-folder", "--root", str(root), "--random-init", "--model", "swinv2-t", "--out", str(out)]
    refused(CliRunner().invoke(main, [*args, "--device", "cpu"]), "3 problem(s) in the metadata", "no mask masks/lonely.png")
    assert not out.exists()
