"""Where outputs go and what they are called (``fcache.common.outputs``): a file name per input that keeps the input's
name (hashed where it must be mangled, refused where two would still collide), never an output inside a folder it must
not touch, and a command's own folder replaced on a rerun while a folder of the user's is refused untouched."""

from __future__ import annotations

import json
import os
import unicodedata

import pytest

from fcache.common.errors import InputError
from fcache.common.outputs import OwnedFolder, check_outside, output_names


def test_names_keep_the_inputs_name_unicode_included():
    assert output_names(["猫.png", "犬.png", "café.jpg", "a/b/c.jpg", "img 1.jpeg", "x"]) == ["猫", "犬", "café", "a__b__c", "img 1", "x"]


def test_names_that_must_be_mangled_get_a_short_hash_and_stay_apart():
    names = output_names(["a:b.jpg", "a?b.jpg", "tab\there.png", "..", "a.jpg", "a.png", "Cat.jpg", "cat.jpg"])
    assert len({n.casefold() for n in names}) == len(names)
    for name, stem in zip(names, ["a_b", "a_b", "tab_here", "_", "a", "a", "Cat", "cat"], strict=True):
        assert name.startswith(stem + "~") and len(name) == len(stem) + 9, name
        assert not set(name) & set('/\\:*?"<>|\t')
    # one character composed or decomposed is one name on a normalising filesystem (APFS, HFS+)
    nfc, nfd = unicodedata.normalize("NFC", "é.jpg"), unicodedata.normalize("NFD", "é.jpg")
    assert len(set(output_names([nfc, nfd]))) == 2
    (long,) = output_names(["猫" * 200 + ".jpg"])
    assert len((long + ".png").encode()) <= 255 and "~" in long
    assert output_names(["a.jpg"]) == output_names(["a.jpg"])  # the same name on every run


def test_two_inputs_that_still_map_to_one_name_are_refused():
    with pytest.raises(InputError, match="x.jpg"):
        output_names(["d1/../x.jpg", "x.jpg", "x.jpg"])


def test_an_output_inside_a_protected_folder_is_refused(tmp_path):
    run, images = tmp_path / "run", tmp_path / "images"
    run.mkdir(), images.mkdir()
    (tmp_path / "link").symlink_to(run)
    protected = [(run, "the RUN folder"), (images, "an input folder")]
    for out in (run, run / "preds", tmp_path / "link" / "p", images / "preds"):
        with pytest.raises(InputError, match="--out .*(RUN folder|input folder)"):
            check_outside(out, "--out", protected)
    check_outside(tmp_path / "preds", "--out", protected)
    check_outside(tmp_path / "run2", "--out", protected)  # a sibling whose name starts the same


def test_a_folder_of_the_users_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "truth.png").write_bytes(b"mine")
    with pytest.raises(InputError, match="did not write"):
        OwnedFolder(out, "--out", "predict.json").check()
    assert (out / "labels" / "truth.png").read_bytes() == b"mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        OwnedFolder(tmp_path / "file", "--out", "predict.json").check()


def test_a_rerun_replaces_its_own_earlier_outputs_only(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "keep"
    outside.mkdir()
    (outside / "k.txt").write_text("k")
    folder = OwnedFolder(out, "--out", "predict.json")
    folder.claim(["labels", "overlays"])
    (out / "overlays").mkdir()
    (out / "overlays" / "old.png").write_bytes(b"old")
    (out / "labels").symlink_to(outside)  # an entry that became a link: the link goes, not what it points at
    folder.claim(["labels"])
    assert sorted(os.listdir(out)) == ["predict.json"] and (outside / "k.txt").read_text() == "k"
    assert json.loads((out / "predict.json").read_text())["entries"] == ["labels"]
    (out / "predict.json").write_text(json.dumps({"entries": ["../keep", "labels"]}))  # never outside the folder
    with pytest.raises(InputError, match="did not write"):
        folder.check()
    assert (outside / "k.txt").read_text() == "k"
