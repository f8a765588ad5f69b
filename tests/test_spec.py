"""The shared vocabulary: geometry mapping, manifest round trip and fingerprint differences."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest

from fcache.common.errors import StoreError
from fcache.spec import GEOMETRY_FIELDS, Geometry, LevelSpec, Manifest, level_name
from helpers import make_manifest


def test_level_names_and_sizes():
    assert [level_name(s) for s in (4, 8, 16, 32)] == ["p2", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="stride 12"):
        level_name(12)
    assert LevelSpec("p2", 96, 4).size(256) == 64


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_boxes_round_trip_through_a_view(flip):
    g = Geometry(orig_h=480, orig_w=640, scale=0.75, crop_x0=40, crop_y0=10, valid_w=400, valid_h=350, flip=flip, canvas=512)
    boxes = np.array([[100, 50, 300, 200], [60, 20, 90, 400]], dtype=np.float64)
    view = g.boxes_to_view(boxes, clip=False)
    np.testing.assert_allclose(g.boxes_from_view(view), boxes)
    expected_x0 = 100 * 0.75 - 40
    if flip:
        assert view[0, 2] == pytest.approx(400 - expected_x0)  # mirrored: old left edge becomes right edge
        assert view[0, 0] < view[0, 2]
    else:
        assert view[0, 0] == pytest.approx(expected_x0)


def test_flip_mirrors_about_the_valid_region():
    g = Geometry(orig_h=100, orig_w=200, scale=1.0, valid_w=200, valid_h=100, canvas=256)
    gf = Geometry(**{**g.to_dict(), "flip": 1.0})
    b = np.array([[10, 10, 50, 60]])
    np.testing.assert_allclose(gf.boxes_to_view(b), [[150, 10, 190, 60]])
    np.testing.assert_allclose(gf.points_to_view(np.array([[10.0, 10.0]])), [[190, 10]])
    assert Geometry.from_array(g.to_array()) == g
    assert len(g.to_array()) == len(GEOMETRY_FIELDS)


def test_manifest_round_trip_and_fingerprint():
    m, _ = make_manifest(frames=4, views=2)
    d = json.loads(json.dumps(m.to_dict()))
    m2 = Manifest.from_dict(d)
    assert m2 == m and m2.fingerprint == m.fingerprint == d["fingerprint"]
    assert m2.num_views == 2 and m2.level_shape("p3") == (4, 16, 8, 8)


def test_fingerprint_ignores_paths_but_not_bytes():
    m, _ = make_manifest()
    moved = Manifest.from_dict({**m.to_dict(), "dataset": {**m.dataset.to_dict(), "root": "/elsewhere"}})
    assert moved.fingerprint == m.fingerprint
    other, _ = make_manifest(dtype="bf16", shard_size=8)
    assert m.differences(other) == ['storage.dtype: "fp16" != "bf16"', "storage.shard_size: 4 != 8"]


def test_unknown_format_version_is_refused():
    m, _ = make_manifest()
    with pytest.raises(StoreError, match="format version 2 is not supported"):
        Manifest.from_dict({**m.to_dict(), "format_version": 2})


def _pinned_manifests() -> dict[str, Manifest]:
    """Manifests whose fingerprints fcache 0.1.0 computed (values below): what they hash must never change."""
    import dataclasses

    from fcache.spec import BackboneInfo, DatasetInfo, Preprocessing, SourceConfig, StorageSpec

    lv = (LevelSpec("p4", 384, 16), LevelSpec("p5", 768, 32))
    bb = BackboneInfo("swinv2-t", "swinv2_tiny_window16_256.ms_in1k", "random-init", 128, 16, lv)
    src = SourceConfig(kind="coco", root="/data/coco/val2017", annotations="/data/ann.json", split="val")
    coco = Manifest(bb, Preprocessing(), StorageSpec(), DatasetInfo(src, n=5000, digest="ab" * 32, task="detection"), libraries={})
    video_source = SourceConfig(kind="video", root="/k400", frames=8, clips=2, crops=3, classes="a,b")
    video = dataclasses.replace(
        coco,
        preprocessing=Preprocessing(frames=8, clips=2, crops=3, views=1),
        dataset=DatasetInfo(video_source, n=10, digest="cd" * 32, task="video", label_names=("a", "b")),
    )
    seg_source = SourceConfig(
        kind="seg-folder", root="/x", stuff_root="/stuff", ignore_index=0, drop_degenerate_boxes=True, max_pixels=1000
    )
    seg = dataclasses.replace(
        coco,
        storage=StorageSpec(dtype="int8", codec="lz4", shard_size=4),
        preprocessing=Preprocessing(views=4, view_scale=(0.1, 2.0), view_flip=True, test_views=("flip", "ms"), seed=3),
        dataset=DatasetInfo(seg_source, n=3, digest="ef" * 32, task="segmentation", label_names=("bg", "cat")),
    )
    return {"coco": coco, "video": video, "seg": seg}


PINNED = {
    "coco": "fa86f060512912c3e059fcfffcf72009be2c3ed7af72c7a6dc6c16458c5145f9",
    "video": "83586eba9d3c4550b4256e44e269f9ca32624820fd01a5e5e85e03418f9faa27",
    "seg": "ce677d40a4c0ca9422f565883d9e224e19765f40a6d30ce987eb772a45bd6367",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_fingerprint_of_a_fixed_manifest_is_pinned(name):
    m = _pinned_manifests()[name]
    assert m.fingerprint == PINNED[name]
    assert Manifest.read(json.loads(json.dumps(m.to_dict())), "x").fingerprint == PINNED[name]


def test_every_field_of_a_fingerprinted_record_has_a_rule():
    """A field added to the manifest's records without a row in FINGERPRINT fails here, not in a user's store."""
    import dataclasses

    from fcache.spec import FINGERPRINT

    def walk(cls: type, rules: dict, where: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in rules, f"{where}{f.name} has no fingerprint rule"
            if isinstance(rules[f.name], dict):
                args = typing.get_args(hints[f.name])  # tuple[LevelSpec, ...] -> LevelSpec
                walk(args[0] if args else hints[f.name], rules[f.name], f"{where}{f.name}.")

    walk(Manifest, FINGERPRINT, "")


def test_a_field_added_later_changes_no_fingerprint_until_it_is_set():
    import dataclasses

    from fcache.spec import FINGERPRINT, WHEN_SET, StorageSpec, fingerprinted

    @dataclasses.dataclass(frozen=True)
    class Later(StorageSpec):
        forms: tuple[str, ...] = ()

    rules = {**FINGERPRINT["storage"], "forms": WHEN_SET}
    assert fingerprinted(Later(), rules) == fingerprinted(StorageSpec(), FINGERPRINT["storage"])
    assert fingerprinted(Later(forms=("p5:int4",)), rules)["forms"] == ["p5:int4"]


def test_per_level_forms_and_budget_are_fingerprinted_only_when_set():
    import dataclasses

    from fcache.spec import StorageSpec

    m = _pinned_manifests()["coco"]
    storage = StorageSpec(forms={"p4": "int3"}, max_error=0.25, measured={"p4": {"rel_rmse": 0.2, "bits": 1.7}})
    compact = dataclasses.replace(m, storage=storage)
    assert storage.form("p4") == "int3" and storage.form("p5") == "fp16"
    assert m.fingerprint == PINNED["coco"] != compact.fingerprint
    assert compact.differences(m) == ['storage.forms: {"p4": "int3"} != null', "storage.max_error: 0.25 != null"]
    measured_again = dataclasses.replace(compact, storage=dataclasses.replace(storage, measured={}))
    assert measured_again.fingerprint == compact.fingerprint  # what was measured is provenance
    back = Manifest.read(json.loads(json.dumps(compact.to_dict())), "x")
    assert back.storage == storage and back.fingerprint == compact.fingerprint
