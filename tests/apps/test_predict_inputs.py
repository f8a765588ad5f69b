"""What `fcache predict` takes: an unreadable input costs itself (a status, a line in OUT/errors.jsonl, exit code 3)
unless --on-error fail stops at it; a store is predicted alone, from a folder or a URL, with its labels; and where
predictions may not go (the RUN, an input folder, a folder of the user's): one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.spec import Targets
from helpers import refused

pytestmark = pytest.mark.slow


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_refuses_an_out_on_the_run_inside_an_input_or_holding_the_users_files(probe_run, tmp_path):
    run, images, store = probe_run.run, probe_run.images, probe_run.store
    before = listing(run), listing(images)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    args = ["predict", str(run), str(images), "--random-init", "--device", "cpu", "--out"]
    refused(invoke(*args, str(run)), f"--out {run}", "RUN folder")
    refused(invoke(*args, str(run / "preds")), "RUN folder")
    refused(invoke(*args, str(images / "cats" / "preds")), "input folder")
    refused(invoke("predict", str(run), str(images / "**" / "*.jpg"), "--random-init", "--out", str(images / "p")), "input folder")
    refused(invoke(*args, str(mine)), "did not write", "notes.txt")
    refused(invoke("predict", str(run), str(store), str(images), "--out", str(tmp_path / "p")), f"{store} is a feature store", "alone")
    refused(invoke("predict", str(run), str(store), str(store), "--out", str(tmp_path / "p")), "one store")
    refused(invoke("predict", str(run), str(store), "--out", str(store / "p")), "input folder")
    assert (listing(run), listing(images)) == before and listing(mine) == {"notes.txt": b"mine"}
    assert not (tmp_path / "p").exists() and not (store / "p").exists()


def test_unreadable_inputs_are_skipped_and_recorded_or_stop_the_run(probe_run, tmp_path):
    bad, clip = tmp_path / "bad.jpg", tmp_path / "clip.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    out = tmp_path / "out"
    r = invoke("predict", str(probe_run.run), str(probe_run.images), str(bad), str(clip), "--out", str(out), "--random-init",
               "--device", "cpu", "--draw", "--json")  # fmt: skip
    assert r.exit_code == 3, r.output
    summary = json.loads(r.stdout)
    assert (summary["inputs"], summary["predicted"], summary["skipped"], summary["exit_code"]) == (6, 4, 2, 3)
    assert summary["status_counts"] == {"ok": 4, "decode_error": 2}
    assert sorted(p["key"] for p in lines(out / "predictions.jsonl")) == sorted(
        str(p.relative_to(probe_run.images)) for p in probe_run.images.rglob("*.jpg")
    )
    errors = {e["key"]: e for e in lines(out / "errors.jsonl")}
    assert errors.keys() == {"bad.jpg", "clip.mp4"} and {e["status"] for e in errors.values()} == {"decode_error"}
    assert all(e["message"].count(e["key"]) == 1 for e in errors.values())  # the path once
    assert "a video" in errors["clip.mp4"]["message"] and "takes images" in errors["clip.mp4"]["message"]
    assert not (out / "overlays").exists()  # nothing is drawn for a label

    # --on-error fail: the predictions before the bad input are kept, the error is one line of its own after the bar
    first, second = sorted(probe_run.images.rglob("*.jpg"))[:2]
    r = invoke("predict", str(probe_run.run), str(first), str(bad), str(second), "--out", str(out), "--random-init", "--device", "cpu",
               "--on-error", "fail")  # fmt: skip
    assert r.exit_code == 1, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and last.count("bad.jpg") == 1 and "--on-error fail" in last and "Traceback" not in r.output
    assert [p["key"] for p in lines(out / "predictions.jsonl")] == [first.name]
    assert [e["key"] for e in lines(out / "errors.jsonl")] == ["bad.jpg"]


def test_a_store_is_predicted_from_a_url_with_its_labels(probe_run, tmp_path, s3_bucket):
    url = f"{s3_bucket}/s.zarr"
    r = invoke("copy", str(probe_run.store), url)
    assert r.exit_code == 0, r.output
    records = {}
    for name, store in (("s3", url), ("local", str(probe_run.store))):
        r = invoke("predict", str(probe_run.run), store, "--out", str(tmp_path / name), "--device", "cpu", "--draw", "--json")
        assert r.exit_code == 0, r.output
        records[name] = lines(tmp_path / name / "predictions.jsonl")
        assert not (tmp_path / name / "overlays").exists()
    s = fstore.open(probe_run.store)
    labels = {str(s.keys[i]): int(np.asarray(s.target(Targets.LABEL, i))) for i in s.ok_indices}
    assert {r["key"]: r["label"] for r in records["s3"]} == labels and min(labels.values()) >= 0
    assert records["s3"] == records["local"]


def test_names_keep_unicode_and_a_rerun_replaces_the_earlier_outputs(seg_run, tmp_path):
    cjk = tmp_path / "cjk"
    cjk.mkdir()
    for name, k in (("猫.png", 0), ("犬.png", 1)):
        shutil.copy(sorted(seg_run.images.glob("*.jpg"))[k], cjk / name)
    out = tmp_path / "out"
    args = ["predict", str(seg_run.run), "--out", str(out), "--random-init", "--device", "cpu", "--draw", "--json"]
    r = invoke(*args[:2], str(cjk), *args[2:])
    assert r.exit_code == 0, r.output
    assert (
        sorted(p.name for p in (out / "labels").iterdir()) == sorted(p.name for p in (out / "overlays").iterdir()) == ["犬.png", "猫.png"]
    )
    r = invoke(*args[:2], str(cjk / "猫.png"), *args[2:])
    assert r.exit_code == 0, r.output
    assert [p.name for p in (out / "labels").iterdir()] == [p.name for p in (out / "overlays").iterdir()] == ["猫.png"]
