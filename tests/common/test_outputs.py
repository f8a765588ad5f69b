"""Where outputs go and what they are called (``fcache.common.outputs``): a file name per input that keeps the input's
name (hashed where it must be mangled, refused where two would still collide), never an output inside a folder it must
not touch, and a command's own folder replaced on a rerun while a folder of the user's is refused untouched."""

from __future__ import annotations

import json
import os
import unicodedata

import pytest

from fcache.common.errors import InputError
from fcache.common.outputs import OwnedFolder, check_outside, digest, output_names


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


def test_a_file_changed_since_it_was_written_is_refused_and_an_unchanged_one_replaced(tmp_path):
    out = tmp_path / "out"
    folder = OwnedFolder(out, "--out", ".marker.json", who="fcache report")
    folder.claim(["a.md", "b.csv", "figs", "never.txt"])
    (out / "a.md").write_text("a")
    (out / "b.csv").write_text("b")
    (out / "figs").mkdir()
    folder.record(["a.md", "b.csv", "figs", "never.txt"], run="r")
    marker = json.loads((out / ".marker.json").read_text())
    assert marker == {
        "run": "r",
        "entries": ["a.md", "b.csv", "figs"],
        "sha256": {"a.md": digest(out / "a.md"), "b.csv": digest(out / "b.csv")},
    }
    assert folder.earlier() == ["a.md", "b.csv", "figs"]
    (out / "a.md").write_text("a, and my notes")
    (out / "never.txt").write_text("mine")  # a name the run did not write in the end: the user's
    with pytest.raises(InputError, match=r"holds files fcache report did not write \(a.md \(changed since\), never.txt\)"):
        folder.claim(["a.md"])
    assert (out / "a.md").read_text() == "a, and my notes" and (out / "b.csv").read_text() == "b" and (out / "figs").is_dir()
    (out / "a.md").write_text("a")  # as written again: the folder is fcache's once more
    (out / "never.txt").unlink()
    folder.claim(["a.md"])
    assert sorted(os.listdir(out)) == [".marker.json"]


def test_a_run_that_stopped_after_claiming_leaves_a_folder_a_rerun_replaces(tmp_path):
    out = tmp_path / "out"
    folder = OwnedFolder(out, "--out", "predict.json")
    folder.claim(["predictions.json", "labels"])
    (out / "predictions.json").write_text("[half")  # the run stopped here: no record, no sha256
    (out / "labels").mkdir()
    (out / "labels" / "x.png").write_bytes(b"png")
    assert folder.earlier() == ["labels", "predictions.json"]
    folder.claim(["predictions.json"])
    assert sorted(os.listdir(out)) == ["predict.json"]


def test_folders_of_earlier_releases_are_recognised(tmp_path):
    old = tmp_path / "predict"  # predict.json with entries and no sha256
    old.mkdir()
    (old / "labels").mkdir()
    (old / "predictions.json").write_text("[]")
    (old / "predict.json").write_text(json.dumps({"entries": ["labels", "predictions.json"], "run": "r"}))
    assert OwnedFolder(old, "--out", "predict.json").earlier() == ["labels", "predictions.json"]
    flat = tmp_path / "report"  # a report's name -> sha256
    flat.mkdir()
    (flat / "report.md").write_text("# report")
    (flat / ".w.json").write_text(json.dumps({"report.md": digest(flat / "report.md")}))
    assert OwnedFolder(flat, "--out", ".w.json").earlier() == ["report.md"]
    (flat / "report.md").write_text("# report, edited")
    with pytest.raises(InputError, match="changed since"):
        OwnedFolder(flat, "--out", ".w.json").earlier()
    bare = tmp_path / "bare"  # no marker: what ``legacy`` names is the command's, anything else is refused
    bare.mkdir()
    (bare / "cka.json").write_text("{}")
    folder = OwnedFolder(bare, "--out", ".m.json", legacy=lambda p: ["cka.json", "cka.png"])
    assert folder.earlier() == ["cka.json"]
    (bare / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"did not write \(notes.txt\)"):
        folder.claim(["cka.json"])
    assert sorted(os.listdir(bare)) == ["cka.json", "notes.txt"]
