"""A store rebuilds its source from its manifest alone: `verify --recompute`, the frozen-online setting and `fcache bench`
need no extract flag repeated (the --drop-degenerate-boxes case used to fail with a MetadataError naming a flag that
`verify` does not have)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from corpus import encode, video
from corpus import photo as small_photo

from fcache import store as fstore
from fcache.cli import main
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import prepare
from fcache.extract.online import OnlineFeatures
from fcache.extract.rebuild import rebuild
from fcache.spec import Manifest
from media import coco_dataset, image_folder

FLAGS = ["--random-init", "--input-size", "64", "--levels", "p4,p5", "--num-workers", "0", "--device", "cpu", "--batch-size", "1"]


def degenerate_coco(root: Path) -> tuple[Path, Path]:
    """The test COCO set with one more annotation whose box has zero width."""
    images, ann = coco_dataset(root, n=3)
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 9, "image_id": 100, "category_id": 1, "bbox": [5.0, 5.0, 0.0, 8.0], "area": 0.0, "iscrowd": 0})
    ann.write_text(json.dumps(data))
    return images, ann


def test_verify_recompute_rebuilds_a_source_extracted_with_drop_degenerate_boxes(tmp_path):
    images, ann = degenerate_coco(tmp_path)
    out = tmp_path / "s.zarr"
    base = ["extract", "--dataset", "coco", "--root", str(images), "--annotations", str(ann), *FLAGS, "--dtype", "fp32", "--out", str(out)]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 2 and "--drop-degenerate-boxes" in r.stderr  # refused without the flag, nothing written
    assert not out.exists()
    r = CliRunner().invoke(main, [*base, "--drop-degenerate-boxes", "--json"])
    assert r.exit_code == 0, r.output
    assert fstore.open(out).manifest.dataset.source.drop_degenerate_boxes
    r = CliRunner().invoke(main, ["verify", str(out), "--recompute", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "OK:" in r.stdout and "2 samples recomputed" in r.stdout
    # the frozen-online setting rebuilds the same source: its features equal the stored (fp32) ones
    s = fstore.open(out)
    online = OnlineFeatures.from_dataset(s.dataset(levels=()), ("p4", "p5"))
    for j in range(len(online)):
        item = online[j]
        for lv in ("p4", "p5"):
            torch.testing.assert_close(item["features"][lv], torch.from_numpy(s.read(lv, item["index"], 0)), rtol=1e-5, atol=1e-5)


def wds_shards(root: Path) -> Path:
    root.mkdir()
    with wds.TarWriter(str(root / "shard-000.tar")) as sink:
        for k in range(2):
            sink.write({"__key__": f"s{k}", "jpg": encode(small_photo(k), "JPEG"), "cls": k})
    return root


def kinetics(root: Path) -> Path:
    for rel in ("juggling/a.mp4", "abseiling/b.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        video(root / rel, n=8)
    return root


def ade(root: Path) -> Path:
    for k in range(2):
        image = small_photo(k)
        label = np.full(image.shape[:2], k + 1, np.uint8)
        for folder, name, data in (
            ("images", f"ADE_{k}.jpg", encode(image, "JPEG")),
            ("annotations", f"ADE_{k}.png", encode(label, "PNG")),
        ):
            (root / folder / "training").mkdir(parents=True, exist_ok=True)
            (root / folder / "training" / name).write_bytes(data)
    return root


def seg_folder(root: Path) -> Path:
    from test_seg_folder import make_seg_folder

    make_seg_folder(root / "seg", n=2, split="train", ignore=7)
    return root / "seg"


SOURCES = {
    "coco": lambda d: dict(zip(("root", "annotations"), map(str, degenerate_coco(d)), strict=True)) | {"drop_degenerate_boxes": True},
    "folder": lambda d: {"root": str(image_folder(d, n=4))},
    "wds": lambda d: {"root": str(wds_shards(d / "shards"))},
    "video": lambda d: {"root": str(kinetics(d)), "frames": 4, "clips": 2},
    "ade20k": lambda d: {"root": str(ade(d)), "split": "training"},
    "seg-folder": lambda d: {"root": str(seg_folder(d)), "split": "train", "ignore_index": 7},
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_any_source_is_rebuilt_from_the_manifest_alone(kind, tmp_path):
    settings = SOURCES[kind](tmp_path)
    cfg = ExtractConfig.from_flags(dataset=kind, model="swinv2-t", random_init=True, input_size=64, levels=("p5",), device="cpu",
                                   max_pixels=10**7, **settings)  # fmt: skip
    source, refs, _, manifest = prepare(cfg)
    stored = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))  # as the store keeps it
    assert stored.dataset.source == cfg.source and stored.fingerprint == manifest.fingerprint
    r = rebuild(stored, [ref.key for ref in refs])
    assert type(r.source) is type(source) and [x.key for x in r.refs] == [x.key for x in refs]
    a, b = source.decode(refs[0]), r.source.decode(r.refs[0])
    np.testing.assert_array_equal(a.image if a.image is not None else a.frames, b.image if b.image is not None else b.frames)
    assert r.backbone.info == manifest.backbone


def test_a_random_init_backbone_is_rebuilt_from_its_seed(tiny_backbone, tmp_path):
    """The frozen-online setting and `fcache bench` get the store's backbone back from the manifest: same weights."""
    from fcache.extract.rebuild import backbone_of
    from helpers import make_manifest

    m, _ = make_manifest()
    m = dataclasses.replace(m, backbone=tiny_backbone.info, preprocessing=dataclasses.replace(m.preprocessing, seed=3))
    again = backbone_of(m)
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    for lv, f in tiny_backbone.forward(images).items():
        torch.testing.assert_close(again.forward(images)[lv], f, rtol=0, atol=0)
