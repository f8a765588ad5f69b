"""The depth-folder source: images/ + depth/ (16-bit PNGs in millimetres, float .npy in metres, --depth-scale), splits as
sub-folders, no measurement stored as 0, bad depth files as sample statuses, mismatched names refused together."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import encode, photo
from PIL import Image

from fcache.cli import main
from fcache.common.errors import InputError, MetadataError
from fcache.extract.sources.base import SampleError
from fcache.extract.sources.depthfolder import DepthFolderSource
from fcache.spec import SourceConfig, Status, Targets
from helpers import make_manifest, refused, source_of


def depth_for(h: int, w: int, seed: int) -> np.ndarray:
    """Metres in 0.5..9.5 at whole millimetres (so a PNG holds them exactly), a row without measurements."""
    d = np.round(np.random.default_rng(seed).uniform(0.5, 9.5, (h, w)), 3).astype(np.float32)
    d[0, :5] = 0.0
    return d


def png16(metres: np.ndarray, per_metre: float = 1000.0) -> bytes:
    return encode(Image.fromarray(np.round(metres * per_metre).astype(np.uint16)), "PNG")


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_depth_folder(root: Path, n: int = 4, split: str = "") -> dict[str, np.ndarray]:
    """root/images[/split]/img<k>.jpg + root/depth[/split]/img<k>.png (even k, millimetres) or .npy (odd k, metres)."""
    images, depth = root / "images" / split, root / "depth" / split
    images.mkdir(parents=True, exist_ok=True)
    depth.mkdir(parents=True, exist_ok=True)
    out = {}
    for k in range(n):
        a = photo(k, 40 + 8 * k)
        (images / f"img{k}.jpg").write_bytes(encode(a, "JPEG"))
        d = depth_for(*a.shape[:2], seed=k)
        (depth / f"img{k}.{'npy' if k % 2 else 'png'}").write_bytes(npy(d) if k % 2 else png16(d))
        out[(Path("images") / split / f"img{k}.jpg").as_posix()] = d
    return out


def test_lists_and_decodes_png_millimetres_and_npy_metres(tmp_path: Path) -> None:
    depths = make_depth_folder(tmp_path)
    src = source_of("depth-folder", tmp_path)
    assert isinstance(src, DepthFolderSource) and src.task == "depth" and src.label_names() == ()
    refs = src.samples()
    assert [r.key for r in refs] == sorted(depths)
    hw = (max(d.shape[0] for d in depths.values()), max(d.shape[1] for d in depths.values()))
    spec = src.target_specs()[Targets.DEPTH]
    assert spec.shape == hw and spec.dtype == "float32" and spec.fill == 0.0
    for ref in refs:
        decoded = src.decode(ref)
        got, want = decoded.targets[Targets.DEPTH], depths[ref.key]
        h, w = want.shape
        assert got.dtype == np.float32 and decoded.image.shape[:2] == (h, w)
        np.testing.assert_allclose(got[:h, :w], want, atol=1e-6)  # PNG millimetres and npy metres both as metres
        assert (got[0, :5] == 0).all() and (got[h:] == 0).all() and (got[:, w:] == 0).all()  # no measurement, padding


def test_depth_scale_and_what_is_not_a_measurement(tmp_path: Path) -> None:
    make_depth_folder(tmp_path, n=2, split="val")
    d = depth_for(*np.asarray(Image.open(tmp_path / "images" / "val" / "img0.jpg")).shape[:2], seed=0)
    (tmp_path / "depth" / "val" / "img0.png").write_bytes(png16(d, per_metre=256.0))  # KITTI's units
    odd = np.load(tmp_path / "depth" / "val" / "img1.npy")
    odd[1, :3] = [-1.0, np.nan, np.inf]
    np.save(tmp_path / "depth" / "val" / "img1.npy", odd * 100.0)  # centimetres
    kitti = source_of("depth-folder", tmp_path, split="val", depth_scale=256.0)
    got = kitti.decode(kitti.samples()[0]).targets[Targets.DEPTH][: d.shape[0], : d.shape[1]]
    np.testing.assert_allclose(got, np.round(d * 256) / 256, atol=1e-6)
    cm = source_of("depth-folder", tmp_path, split="val", depth_scale=100.0)
    got = cm.decode(cm.samples()[1]).targets[Targets.DEPTH]
    assert list(got[1, :3]) == [0.0, 0.0, 0.0] and got[1, 3] == pytest.approx(odd[1, 3], rel=1e-6)


def test_bad_depth_files_cost_their_sample(tmp_path: Path) -> None:
    make_depth_folder(tmp_path, n=5)
    folder = tmp_path / "depth"
    (folder / "img0.png").write_bytes(b"")
    (folder / "img1.npy").write_bytes(b"\x93NUMPY not really")
    (folder / "img2.png").write_bytes(encode(photo(2, 56), "PNG"))  # an RGB picture, not a depth map
    np.save(folder / "img3.npy", np.ones((4, 4, 3), np.float32))  # three channels
    (folder / "img4.png").unlink()
    (folder / "img4.npy").write_bytes(npy(np.ones((5, 7), np.float32)))  # not the image's size
    src = source_of("depth-folder", tmp_path)
    statuses = {}
    for ref in src.samples():
        with pytest.raises(SampleError) as e:
            src.decode(ref)
        statuses[ref.key] = (e.value.status, str(e.value))
    assert statuses["images/img0.jpg"][0] == Status.EMPTY_FILE
    assert statuses["images/img1.jpg"][0] == Status.DECODE_ERROR and "is not a PNG or NPY file" in statuses["images/img1.jpg"][1]
    assert statuses["images/img2.jpg"][0] == Status.DECODE_ERROR and "a depth PNG is grey" in statuses["images/img2.jpg"][1]
    assert statuses["images/img3.jpg"][0] == Status.DECODE_ERROR
    assert statuses["images/img4.jpg"][0] == Status.SIZE_MISMATCH


def test_layout_problems_and_settings(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_depth_folder(root, n=2, split="train")
    with pytest.raises(InputError, match=r"expected folders images and depth .* splits found: train \(--split NAME\)"):
        source_of("depth-folder", root).samples()
    (root / "images" / "train" / "lonely.jpg").write_bytes(encode(photo(0, 16), "JPEG"))
    (root / "depth" / "train" / "orphan.npy").write_bytes(npy(np.ones((4, 4), np.float32)))
    with pytest.raises(MetadataError) as e:
        source_of("depth-folder", root, split="train").samples()
    assert len(e.value.problems) == 2
    assert any("images/train/lonely.jpg: no depth map depth/train/lonely.png|.npy" in p for p in e.value.problems)
    assert any("1 depth map(s) in depth/train have no image (orphan.npy)" in p for p in e.value.problems)
    with pytest.raises(InputError, match="--depth-scale is not used by --dataset seg-folder"):
        source_of("seg-folder", root, depth_scale=256.0)
    with pytest.raises(InputError, match="--classes is not used by --dataset depth-folder"):
        source_of("depth-folder", root, split="train", classes="a,b")
    with pytest.raises(InputError, match="must name a sub-folder of images/ and depth/"):
        source_of("depth-folder", root, split="../train")
    out = tmp_path / "s.zarr"
    args = ["extract", "--dataset", "depth-folder", "--root", str(root), "--split", "train", "--random-init", "--model", "swinv2-t"]
    refused(CliRunner().invoke(main, [*args, "--out", str(out), "--device", "cpu"]), "2 problem(s) in the metadata", "no depth map")
    assert not out.exists()


def test_depth_scale_is_fingerprinted_only_when_set():
    m, _ = make_manifest()
    same = m.__class__(**{**m.__dict__, "dataset": m.dataset.__class__(**{**m.dataset.__dict__, "source": SourceConfig("synthetic", "")})})
    assert same.fingerprint == m.fingerprint and "depth_scale" not in str(m.fingerprinted())
    kitti = SourceConfig("synthetic", "", depth_scale=256.0)
    other = m.__class__(**{**m.__dict__, "dataset": m.dataset.__class__(**{**m.dataset.__dict__, "source": kitti})})
    assert other.fingerprint != m.fingerprint and other.fingerprinted()["dataset"]["source"]["depth_scale"] == 256.0
