"""The coco source: validation that reports every problem at once, targets, EXIF / size rules, escaping paths."""

from __future__ import annotations

import json
import logging
import pickle
import re
from array import array
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import encode, photo, with_exif_orientation
from pycocotools import mask as mask_utils

from fcache.cli import main
from fcache.common.errors import MetadataError
from fcache.extract.sources import coco
from fcache.extract.sources.base import SampleError
from fcache.extract.sources.coco import CocoSource
from fcache.spec import Status, Targets
from helpers import refused, source_of

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "cat"}]


def write_dataset(root: Path) -> tuple[Path, dict]:
    """root/images/<k>.jpg (real photos, varied sizes) + a valid COCO json; image ids in reverse file order."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for k in range(3):
        a = photo(k, 48 + 8 * k)
        (root / "images" / f"{k}.jpg").write_bytes(encode(a, "JPEG"))
        images.append({"id": 10 - k, "file_name": f"{k}.jpg", "width": a.shape[1], "height": a.shape[0]})
    anns.append({"id": 7, "image_id": 10, "category_id": 1, "bbox": [1, 2, 10, 20], "iscrowd": 0, "area": 200.0, "segmentation": []})
    anns.append({"id": 5, "image_id": 10, "category_id": 3, "bbox": [5, 5, 4, 4], "segmentation": [[5, 5, 9, 5, 9, 9]]})
    h, w = images[1]["height"], images[1]["width"]
    crowd = np.zeros((h, w), np.uint8, order="F")
    crowd[:8, :8] = 1
    rle = {"counts": mask_utils.encode(crowd)["counts"].decode("ascii"), "size": [h, w]}
    anns.append({"id": 6, "image_id": 9, "category_id": 3, "bbox": [0, 0, 8, 8], "iscrowd": 1, "segmentation": rle})
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def test_valid_dataset_lists_samples_and_targets(tmp_path: Path) -> None:
    ann_path, data = write_dataset(tmp_path)
    src = source_of("coco", tmp_path / "images", annotations=ann_path)
    assert isinstance(src, CocoSource) and src.task == "detection" and src.label_names() == ()
    refs = src.samples()
    assert [r.key for r in refs] == ["8", "9", "10"]  # ordered by image id; image 8 has no annotation and is a sample
    assert refs[0].path == str(tmp_path / "images" / "2.jpg")
    assert src.target_attrs() == {"categories": CATEGORIES}
    assert set(src.target_specs()) == {Targets.IMAGE, Targets.ANNOTATIONS}
    t = src.driver_targets(refs)
    assert json.loads(t[Targets.IMAGE][2]) == data["images"][0]
    assert json.loads(t[Targets.ANNOTATIONS][0]) == []
    anns10 = json.loads(t[Targets.ANNOTATIONS][2])
    assert [a["id"] for a in anns10] == [5, 7]  # sorted by annotation id
    assert anns10[0]["iscrowd"] == 0 and anns10[0]["area"] == 16.0  # filled in when missing
    assert anns10[1]["area"] == 200.0  # kept when present
    d = src.decode(refs[2])
    assert d.image.shape == (data["images"][0]["height"], data["images"][0]["width"], 3) and d.orientation == 1
    again = pickle.loads(pickle.dumps(src))  # what a spawned DataLoader worker gets: no json index
    assert again._images is None and again.decode(refs[0]).image.dtype == np.uint8


def test_every_metadata_problem_is_reported_at_once(tmp_path: Path) -> None:
    ann_path, data = write_dataset(tmp_path)
    data["images"].append({"id": 9, "file_name": "1.jpg", "width": 5, "height": 5})  # duplicate image id
    data["images"].append({"id": 20, "file_name": "0.jpg", "height": 5})  # missing width
    data["images"].append({"id": 21, "file_name": "missing.jpg", "width": 5, "height": 0})  # h = 0, no file
    data["annotations"] += [
        {"id": 7, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1]},  # duplicate annotation id
        {"id": 30, "image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1]},  # dangling image id
        {"id": 31, "image_id": 10, "category_id": 2, "bbox": [0, 0, 1, 1]},  # dangling category id
        {"id": 32, "image_id": 10, "category_id": 1, "bbox": [0, 0, 0, 5]},  # w = 0
        {"id": 33, "image_id": 10, "category_id": 1},  # missing bbox
        {"id": 34, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 2},
        {"id": 35, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1]},  # not 4 numbers
        {"id": 36, "image_id": 10, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": [[1, 2, 3]]},
    ]
    ann_path.write_text(json.dumps(data))
    with pytest.raises(MetadataError) as e:
        CocoSource(tmp_path / "images", ann_path).samples()
    expected = [
        "image id 9 appears 2 times",
        "image 20: missing field(s) width",
        "image 21: height 0 must be > 0",
        "image 21: file 'missing.jpg' does not exist",
        "annotation id 7 appears 2 times",
        "annotation 30: image_id 999 is not an id in images[]",
        "annotation 31: category_id 2 is not an id in categories[]",
        "annotation 32: bbox [0, 0, 0, 5] has w or h <= 0",
        "annotation 33: missing field(s) bbox",
        "annotation 34: iscrowd 2 must be 0 or 1",
        "annotation 35: bbox [0, 0, 1] must be 4 numbers",
        "annotation 36: segmentation polygons must be",
    ]
    for text in expected:
        assert any(text in p for p in e.value.problems), (text, e.value.problems)
    assert len(e.value.problems) == len(expected), e.value.problems
    assert "12 problem(s)" in str(e.value) and "fix the json" in str(e.value)


def test_degenerate_boxes_can_be_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann_path, data = write_dataset(tmp_path)
    data["annotations"].append({"id": 40, "image_id": 10, "category_id": 1, "bbox": [3, 3, 0, 0]})
    ann_path.write_text(json.dumps(data))
    with pytest.raises(MetadataError, match=r"bbox \[3, 3, 0, 0\] has w or h <= 0.*--drop-degenerate-boxes"):
        CocoSource(tmp_path / "images", ann_path).samples()
    src = source_of("coco", tmp_path / "images", annotations=ann_path, drop_degenerate_boxes=True)
    with caplog.at_level(logging.WARNING):
        refs = src.samples()
    assert "dropped 1 annotation" in caplog.text
    kept = json.loads(src.driver_targets(refs)[Targets.ANNOTATIONS][2])
    assert [a["id"] for a in kept] == [5, 7]


def test_unreadable_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"\(a COCO json\) is not valid JSON"):
        CocoSource(tmp_path, tmp_path / "bad.json").samples()
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(MetadataError, match="top level"):
        CocoSource(tmp_path, tmp_path / "list.json").samples()


def test_file_name_escaping_root_is_the_samples_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann_path, data = write_dataset(tmp_path)
    (tmp_path / "outside.jpg").write_bytes(encode(photo(0, 32), "JPEG"))
    data["images"].append({"id": 50, "file_name": "../outside.jpg", "width": 32, "height": 32})
    data["images"].append({"id": 51, "file_name": str(tmp_path / "outside.jpg"), "width": 32, "height": 32})
    ann_path.write_text(json.dumps(data))
    src = CocoSource(tmp_path / "images", ann_path)
    with caplog.at_level(logging.WARNING):
        refs = {r.key: r for r in src.samples()}
    assert "2 image(s) have a file_name escaping --root" in caplog.text
    for key in ("50", "51"):
        with pytest.raises(SampleError) as e:
            src.decode(refs[key])
        assert e.value.status == Status.OUTSIDE_ROOT


def test_size_and_exif_orientation_follow_the_json(tmp_path: Path) -> None:
    ann_path, data = write_dataset(tmp_path)
    a = photo(1, 40)  # (h, w) = (40 * h / w, 40): wider than high
    h, w = a.shape[:2]
    (tmp_path / "images" / "rot.png").write_bytes(with_exif_orientation(a, 6))
    data["images"] += [
        {"id": 60, "file_name": "rot.png", "width": h, "height": w},  # json in the oriented frame: applied
        {"id": 61, "file_name": "rot.png", "width": w, "height": h},  # json in the stored frame: not applied
        {"id": 62, "file_name": "rot.png", "width": w + 1, "height": h},  # neither
    ]
    ann_path.write_text(json.dumps(data))
    src = CocoSource(tmp_path / "images", ann_path)
    refs = {r.key: r for r in src.samples()}
    d = src.decode(refs["60"])
    assert d.orientation == 6 and d.image.shape == (w, h, 3)
    np.testing.assert_array_equal(d.image, np.rot90(a, k=-1))
    d = src.decode(refs["61"])
    assert d.orientation == 1 and d.image.shape == (h, w, 3) and "not applied" in d.message
    with pytest.raises(SampleError) as e:
        src.decode(refs["62"])
    assert e.value.status == Status.SIZE_MISMATCH


def test_flags_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --annotations"):
        source_of("coco", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        source_of("coco", tmp_path / "nope", annotations=tmp_path / "a.json")


@pytest.mark.parametrize(
    ("segmentation", "fragment"),
    [
        ({"size": 5, "counts": "g0"}, "segmentation RLE size 5 must be [height, width]"),
        ({"size": None, "counts": "g0"}, "segmentation RLE size None must be [height, width]"),
        ({"size": "HW", "counts": [-5, 3]}, "segmentation RLE counts '[-5, 3]' are not a list of run lengths"),
        ({"size": "HW", "counts": [5, 1e12]}, "segmentation RLE counts '[5, 1000000000000.0]' are not a list of run lengths"),
        ({"size": "HW", "counts": 5}, "segmentation RLE counts '5' are not a list of run lengths"),
        ({"size": "HW", "counts": "!!!garbage"}, "segmentation RLE counts '!!!garbage' are not a COCO compressed RLE string"),
        ({"size": "HW", "counts": [3, 4]}, "segmentation RLE counts cover 7 pixels"),
        ({"size": [2, 2], "counts": [4]}, "segmentation RLE size [2, 2] is not the image's"),
    ],
)
def test_rle_is_validated_at_listing(tmp_path: Path, segmentation: dict, fragment: str) -> None:
    """A broken RLE is a metadata problem naming the annotation, found before any backbone work (not a crash later)."""
    ann_path, data = write_dataset(tmp_path)
    image = data["images"][1]
    if segmentation["size"] == "HW":
        segmentation = {**segmentation, "size": [image["height"], image["width"]]}
    data["annotations"][2]["segmentation"] = segmentation
    ann_path.write_text(json.dumps(data))
    with pytest.raises(MetadataError, match=re.escape(f"annotation 6: {fragment}")):
        source_of("coco", tmp_path / "images", annotations=ann_path).samples()
    r = CliRunner().invoke(main, ["plan", "--dataset", "coco", "--root", str(tmp_path / "images"), "--annotations", str(ann_path),
                                  "--random-init", "--no-run", "--device", "cpu"])  # fmt: skip
    refused(r, "annotation 6", fragment)


def test_a_json_nested_absurdly_deep_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    ann = tmp_path / "deep.json"
    ann.write_text('{"images": ' + "[" * 50_000 + "]" * 50_000 + "}")
    r = CliRunner().invoke(main, ["plan", "--dataset", "coco", "--root", str(tmp_path / "images"), "--annotations", str(ann),
                                  "--random-init", "--no-run", "--device", "cpu"])  # fmt: skip
    refused(r, str(ann), "nested 50001 levels deep")


def write_stuff(stuff_root: Path, data: dict) -> dict[str, np.ndarray]:
    """stuff_root/<image stem>.png for every image of ``data``: values 0..199 (>= 183 must read as ignore) and some 255."""
    stuff_root.mkdir(exist_ok=True)
    maps = {}
    for k, im in enumerate(data["images"]):
        lab = (np.arange(im["height"] * im["width"]).reshape(im["height"], im["width"]) * (k + 3) % 200).astype(np.uint8)
        lab[0, :3] = 255
        (stuff_root / Path(im["file_name"]).with_suffix(".png")).write_bytes(encode(lab, "PNG"))
        maps[str(im["id"])] = lab
    return maps


def test_stuff_maps_are_decoded_padded_and_ignore_unknown_values(tmp_path: Path) -> None:
    ann_path, data = write_dataset(tmp_path)
    maps = write_stuff(tmp_path / "stuff", data)
    src = source_of("coco", tmp_path / "images", annotations=ann_path, stuff_root=tmp_path / "stuff")
    refs = {r.key: r for r in src.samples()}
    hmax, wmax = max(im["height"] for im in data["images"]), max(im["width"] for im in data["images"])
    assert src.target_specs()[Targets.STUFF].shape == (hmax, wmax) and src.target_specs()[Targets.STUFF].fill == 255
    worker = pickle.loads(pickle.dumps(src))  # a DataLoader worker: no json index, still the target's size
    for key, lab in maps.items():
        got = worker.decode(refs[key]).targets[Targets.STUFF]
        h, w = lab.shape
        assert got.shape == (hmax, wmax) and (got[h:] == 255).all() and (got[:, w:] == 255).all()
        np.testing.assert_array_equal(got[:h, :w], np.where(lab >= 183, 255, lab))
    assert Targets.STUFF not in CocoSource(tmp_path / "images", ann_path).decode(refs["10"]).targets


def test_stuff_maps_are_checked(tmp_path: Path) -> None:
    ann_path, data = write_dataset(tmp_path)
    write_stuff(tmp_path / "stuff", data)
    (tmp_path / "stuff" / "1.png").unlink()
    with pytest.raises(MetadataError, match=r"image 9: no stuff map .*1\.png.*--stuff-root"):
        source_of("coco", tmp_path / "images", annotations=ann_path, stuff_root=tmp_path / "stuff").samples()
    with pytest.raises(ValueError, match="--stuff-root .* is not a folder"):
        source_of("coco", tmp_path / "images", annotations=ann_path, stuff_root=tmp_path / "nope")
    with pytest.raises(ValueError, match="--stuff-root is not used by --dataset folder"):
        source_of("folder", tmp_path / "images", stuff_root=tmp_path / "stuff")
    im = next(i for i in data["images"] if i["id"] == 9)  # a stuff map the wrong size is that sample's SIZE_MISMATCH
    (tmp_path / "stuff" / "1.png").write_bytes(encode(np.zeros((im["height"] + 1, im["width"]), np.uint8), "PNG"))
    src = CocoSource(tmp_path / "images", ann_path, stuff_root=tmp_path / "stuff")
    with pytest.raises(SampleError) as e:
        src.decode({r.key: r for r in src.samples()}["9"])
    assert e.value.status == Status.SIZE_MISMATCH


def test_a_stuff_map_follows_its_images_exif_orientation(tmp_path: Path) -> None:
    ann_path, data = write_dataset(tmp_path)
    a = photo(1, 40)
    h, w = a.shape[:2]
    (tmp_path / "images" / "rot.png").write_bytes(with_exif_orientation(a, 6))
    data["images"] = [{"id": 60, "file_name": "rot.png", "width": h, "height": w}]  # the json in the oriented frame
    data["annotations"] = []
    ann_path.write_text(json.dumps(data))
    (tmp_path / "stuff").mkdir()
    lab = (np.arange(h * w).reshape(h, w) % 150).astype(np.uint8)  # on the stored pixel grid
    (tmp_path / "stuff" / "rot.png").write_bytes(encode(lab, "PNG"))
    src = CocoSource(tmp_path / "images", ann_path, stuff_root=tmp_path / "stuff")
    d = src.decode(src.samples()[0])
    assert d.orientation == 6
    np.testing.assert_array_equal(d.targets[Targets.STUFF], np.rot90(lab, k=-1))  # turned with its image


def test_column_check_gives_what_the_entry_by_entry_check_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path (polygons packed while parsing, annotations checked by column) and the exact path agree on every
    target, including filled-in iscrowd/area, uncompressed crowd RLEs, integer polygons and dropped degenerate boxes."""
    from fcache.extract.sources import coco

    ann_path, data = write_dataset(tmp_path)
    data["annotations"] += [
        {
            "id": 40,
            "image_id": 8,
            "category_id": 1,
            "bbox": [1.5, 2.25, 3.0, 4.0],
            "segmentation": [[0.5, 1.5, 2.5, 3.5, 4.5, 5.5], [1.0] * 8],
        },
        {"id": 41, "image_id": 8, "category_id": 3, "bbox": [0, 0, 0, 4], "segmentation": [[0.5, 1.5, 2.5, 3.5, 4.5, 5.5]]},  # dropped
        {"id": 39, "image_id": 9, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 0, "area": 3},
    ]
    h, w = data["images"][1]["height"], data["images"][1]["width"]
    data["annotations"].append({"id": 42, "image_id": 9, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 1,
                                "segmentation": {"counts": [h * w - 4, 4], "size": [h, w]}})  # fmt: skip
    ann_path.write_text(json.dumps(data))
    calls = []
    fast = coco.fast_annotations
    monkeypatch.setattr(coco, "fast_annotations", lambda *a, **k: calls.append(r := fast(*a, **k)) or r)
    src = coco.CocoSource(tmp_path / "images", ann_path, drop_degenerate_boxes=True)
    got = src.driver_targets(src.samples())
    assert calls and calls[0] is not None  # the fast path answered
    monkeypatch.setattr(coco, "fast_annotations", lambda *a, **k: None)
    exact = coco.CocoSource(tmp_path / "images", ann_path, drop_degenerate_boxes=True)
    want = exact.driver_targets(exact.samples())
    for name in want:
        assert [json.loads(x) for x in got[name]] == [json.loads(x) for x in want[name]]
    anns8 = json.loads(got[Targets.ANNOTATIONS][0])
    assert [a["id"] for a in anns8] == [40] and anns8[0]["segmentation"][1] == [1.0] * 8 and anns8[0]["area"] == 12.0
    assert [a["id"] for a in json.loads(got[Targets.ANNOTATIONS][1])] == [6, 39, 42]


def test_driver_targets_are_written_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of whole shards (here one shard of 2 samples each) give the store the same targets as one block."""
    import dataclasses

    from fcache import store as fstore
    from fcache.extract.sources import base
    from fcache.spec import keys_digest
    from helpers import make_manifest

    ann_path, _ = write_dataset(tmp_path)
    src = CocoSource(tmp_path / "images", ann_path)
    refs = src.samples()
    keys = [r.key for r in refs]
    m, _ = make_manifest(n=len(refs), shard_size=2)
    m = dataclasses.replace(m, dataset=dataclasses.replace(m.dataset, digest=keys_digest(keys)))
    writer = fstore.create(tmp_path / "s.zarr", m, keys, targets=src.target_specs(), target_attrs=src.target_attrs())
    monkeypatch.setattr(base, "TARGET_BLOCK_UNITS", 1)
    base.write_driver_targets(writer, src, refs)
    s = fstore.FeatureStore(tmp_path / "s.zarr")
    whole = src.driver_targets(refs)
    for name in (Targets.IMAGE, Targets.ANNOTATIONS):
        assert list(s.target(name)) == list(whole[name])
    assert [a["id"] for a in json.loads(s.target(Targets.ANNOTATIONS, 2))] == [5, 7]  # image 10, the third sample


@pytest.mark.parametrize(
    "doc",
    [
        [{"id": 1, "bbox": [0.1, 2.5, 1e16, 3e-7], "segmentation": [array("d", [1.5, 2.0, 3.25, 4.0, 5.0, 6.125])], "iscrowd": 0}],
        {"file_name": "ünïcode/日本.jpg", "height": 480, "width": 640, "note": "null", "flag": True, "none": None},
        [{"id": 2, "area": float("nan"), "bbox": [float("inf"), 0, 1, 1]}],  # json writes NaN / Infinity, orjson null
        {"id": 1 << 70, "big": -(1 << 65)},  # beyond 64 bits: orjson refuses
        {1: "an int key", 2.5: "a float key"},  # json turns keys into strings, orjson refuses
        [],
    ],
)
def test_target_text_parses_back_to_what_json_writes(doc: object) -> None:
    expected = json.loads(coco._ENCODER.encode(doc))
    got = json.loads(coco.json_text(doc))
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)  # NaN == NaN as text


def test_target_text_of_a_plain_document_is_orjsons() -> None:
    doc = [{"id": 7, "bbox": [1.0, 2.0, 3.0, 4.0], "segmentation": [array("d", [0.5, 1.0, 2.0, 1.0, 2.0, 3.0])]}]
    assert coco.json_text(doc) == '[{"id":7,"bbox":[1.0,2.0,3.0,4.0],"segmentation":[[0.5,1.0,2.0,1.0,2.0,3.0]]}]'
    assert json.loads(coco.json_text(doc)) == json.loads(coco._ENCODER.encode(doc))
