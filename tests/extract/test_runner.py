"""`fcache extract` end to end: features equal timm's forward, determinism, resume after SIGKILL, errors."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract
from fcache.extract.views import image_views, render
from fcache.spec import Status, Targets
from helpers import extract_killed_after
from media import coco_dataset, image_folder

BASE = dict(model="swinv2-t", random_init=True, input_size=128, shard_size=2, batch_size=3, num_workers=0, seed=0)


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig.from_flags(**{**BASE, **kw})


def folder_flags(root, *extra: str) -> list[str]:
    """CLI flags for BASE's random-init SwinV2-T at 128 px over the folder ``root``, in process, on the CPU."""
    return [
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--random-init",
        "--input-size",
        "128",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


def all_arrays(path) -> dict[str, np.ndarray]:
    s = fstore.open(path)
    out = {"status": s.status, "geometry": s.geometry_array, "keys": s.keys.astype(str)}
    for lv in s.level_names:
        out[lv] = np.asarray(s.to_dask(lv).compute())
    return out


def assert_same_store(a, b) -> None:
    x, y = all_arrays(a), all_arrays(b)
    assert set(x) == set(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("folder"), n=5)


def test_stored_features_equal_direct_timm_forward(tmp_path, folder):
    out = tmp_path / "s.zarr"
    summary = run_extract(cfg(dataset="folder", root=str(folder), out=str(out), dtype="fp32"))
    assert summary.exit_code == 0 and summary.status_counts == {"ok": 5}
    s = fstore.open(out)
    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window16_256", pretrained=False, features_only=True, img_size=128).eval()
    pre = s.manifest.preprocessing
    from PIL import Image

    for i in (0, 3):
        rel = str(s.keys[i])
        img = np.asarray(Image.open(folder / rel).convert("RGB"))
        (g,) = image_views(img.shape[0], img.shape[1], pre, 128, rel)
        np.testing.assert_array_equal(s.geometry_array[i, 0], g.to_array())  # stored as float32
        with torch.inference_mode():
            want = model(render(img, g, pre.mean, pre.std)[None])
        for lv, w in zip(s.level_names, want, strict=True):
            np.testing.assert_allclose(s.read(lv, i, 0), w[0].permute(2, 0, 1).numpy(), rtol=0, atol=1e-5)
    assert list(s.manifest.dataset.label_names) == ["cats", "dogs"]
    assert s.target(Targets.LABEL).tolist() == [0 if str(k).startswith("cats/") else 1 for k in s.keys]


def test_deterministic_across_batch_sizes_and_workers(tmp_path, folder):
    runs = [dict(batch_size=1, num_workers=0), dict(batch_size=4, num_workers=2), dict(batch_size=7, num_workers=1)]
    paths = []
    for k, kw in enumerate(runs):
        paths.append(tmp_path / f"s{k}.zarr")
        run_extract(cfg(dataset="folder", root=str(folder), out=str(paths[-1]), views=2, view_scale=(0.5, 1.5), **kw))
    for p in paths[1:]:
        assert_same_store(paths[0], p)


def test_coco_targets_are_copied(tmp_path):
    images, ann = coco_dataset(tmp_path / "coco", n=4)
    out = tmp_path / "s.zarr"
    run_extract(cfg(dataset="coco", root=str(images), annotations=str(ann), out=str(out), test_views=("flip",)))
    s = fstore.open(out)
    assert s.num_views == 2 and s.manifest.view_names == ("plain", "flip")
    assert [json.loads(x)["id"] for x in s.target(Targets.IMAGE)] == [100, 101, 102, 103]
    anns = [json.loads(x) for x in s.target(Targets.ANNOTATIONS)]
    assert [len(a) for a in anns] == [1, 1, 1, 0]  # the image without annotations is still extracted
    assert [c["name"] for c in s.target_attrs["categories"]] == ["square", "disc"]
    assert s.geometry(0, 1).flip == 1.0


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, folder):
    args = folder_flags(folder, "--shard-size", "1", "--batch-size", "1")
    ref = tmp_path / "ref.zarr"
    r = subprocess.run([sys.executable, "-m", "fcache", "extract", *args, "--out", str(ref), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed.zarr"
    done = extract_killed_after(args, killed)
    assert 2 <= done < 5
    r = subprocess.run([sys.executable, "-m", "fcache", "extract", *args, "--out", str(killed), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["processed"] == 5 - done  # only the missing units
    assert_same_store(ref, killed)
    assert CliRunner().invoke(main, ["verify", str(killed)]).exit_code == 0


def test_resume_deletes_what_killed_writers_left(tmp_path, folder):
    """A kill between a unit's commit and its lock's release, or inside a write, leaves a lock and a temporary."""
    out = tmp_path / "s.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(out), shard_size=2))
    lock, tmp = out / "ledger" / "lock" / "000000.lock", out / "ledger" / "done" / ".000001.json.4242-abcd.partial"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("{}")
    tmp.write_text("{}")
    shard = next(p for p in (out / "features").rglob("*") if p.is_file() and "/c/" in str(p))
    tmp_shard = shard.with_name(".0.1234.partial")
    tmp_shard.write_bytes(b"x")
    report = fstore.verify(out)
    assert sorted(p.kind for p in report.problems) == ["lock", "temporary", "temporary"]
    s = run_extract(cfg(dataset="folder", root=str(folder), out=str(out), shard_size=2))
    assert s.processed == 0 and fstore.verify(out).ok
    assert not lock.exists() and not tmp.exists() and not tmp_shard.exists()


def test_other_configuration_is_refused_then_overwritten(tmp_path, folder):
    out = tmp_path / "s.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(out)))
    base = ["extract", *folder_flags(folder, "--out", str(out), "--shard-size", "2")]
    r = CliRunner().invoke(main, [*base, "--dtype", "bf16"])
    assert r.exit_code == 2 and 'storage.dtype: "fp16" != "bf16"' in r.output and "--overwrite" in r.output
    assert fstore.open(out).manifest.storage.dtype == "fp16"
    r = CliRunner().invoke(main, [*base, "--dtype", "bf16", "--overwrite", "--json"])
    assert r.exit_code == 0, r.output
    assert fstore.open(out).manifest.storage.dtype == "bf16"


def test_a_store_inside_the_dataset_folder_is_refused(folder):
    out = folder / "cache.zarr"
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--out", str(out))])
    assert r.exit_code == 2 and "is inside --root" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_samples_are_skipped_or_stop_the_run(tmp_path, folder):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folder, root)
    (root / "cats" / "broken.jpg").write_bytes(b"")
    (root / "dogs" / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    out = tmp_path / "s.zarr"
    s = run_extract(cfg(dataset="folder", root=str(root), out=str(out)))
    assert s.exit_code == 3 and s.status_counts == {"ok": 5, "empty_file": 1, "decode_error": 1}
    st = fstore.open(out)
    ok = {str(st.keys[i]) for i in st.ok_indices}
    assert "cats/broken.jpg" not in ok and len(ok) == 5
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["key"]: e["status"] for e in errors} == {"cats/broken.jpg": "empty_file", "dogs/noise.png": "decode_error"}
    fail = tmp_path / "f.zarr"
    r = CliRunner().invoke(main, ["extract", *folder_flags(root, "--out", str(fail), "--on-error", "fail")])
    assert r.exit_code == 1 and "cats/broken.jpg" in r.output
    assert fstore.open(fail).status_counts().get("ok", 0) < 5


def test_flag_errors_are_one_line_exit_2(tmp_path, folder):
    base = ["extract", "--dataset", "folder", "--root", str(folder), "--out", str(tmp_path / "x.zarr"), "--device", "cpu"]
    cases = [
        (["--model", "swinv2-g"], "never published"),
        (["--random-init", "--input-size", "100"], "multiple of 32"),
        (["--random-init", "--model", "nope"], "unknown model"),
        (["--random-init", "--levels", "p9"], "unknown level"),
        (["--random-init", "--codec", "brotli"], "unknown codec"),
    ]
    for extra, msg in cases:
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.zarr").exists()


def test_plan_reports_sizes_and_giant_bytes(folder):
    r = CliRunner().invoke(
        main,
        [
            "plan",
            "--dataset",
            "folder",
            "--root",
            str(folder),
            "--model",
            "swinv2-g",
            "--input-size",
            "1024",
            "--dtype",
            "bf16",
            "--no-run",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["bytes_per_sample"] == 2 * (512 * 256**2 + 1024 * 128**2 + 2048 * 64**2 + 4096 * 32**2)  # ~126 MB per image
    assert 125e6 < p["bytes_per_sample"] < 127e6 and p["total_bytes"] == 5 * p["bytes_per_sample"]
    assert p["gflops_per_image"] > 1000
    assert p["backbone_params"] == 2_997_835_488 and p["window"] == 32  # the paper's 3.0B SwinV2-G, its COCO window
    r = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--no-run", "--window", "8")])
    assert r.exit_code == 0, r.output
    assert "backbone: 27.6M parameters" in r.output and "window 8" in r.output
    r = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--measure", "2")])
    assert r.exit_code == 0, r.output
    assert "compression ratio" in r.output and "measured on 2 samples" in r.output


def test_int8_store_from_real_features(tmp_path, folder):
    out = tmp_path / "s.zarr"
    run_extract(dataclasses.replace(cfg(dataset="folder", root=str(folder), out=str(out)), dtype="int8"))
    err = fstore.open(out).quantisation_error
    assert set(err) == {"p2", "p3", "p4", "p5"} and all(0 < e < 0.01 for e in err.values())
    assert Status.OK in set(fstore.open(out).status)


def test_verify_recompute_detects_tampered_features(tmp_path, folder):
    out = tmp_path / "s.zarr"
    run_extract(cfg(dataset="folder", root=str(folder), out=str(out), dtype="fp16", codec="none"))
    r = CliRunner().invoke(main, ["verify", str(out), "--recompute", "5"])
    assert r.exit_code == 0, r.output
    assert "5 samples recomputed" in r.output
    import zarr

    arr = zarr.open_array(str(out / "features" / "p4"), mode="r+")
    arr[2] = np.asarray(arr[2]) * 1.5  # consistent bytes, wrong values: only a recompute can tell
    from fcache.store import layout

    rec_path = layout.done_path(out, layout.units(5, 2)[1])
    rec = json.loads(rec_path.read_text())
    shard = "features/p4/c/1/0/0/0/0"
    rec["files"][shard]["sha256"] = layout.sha256_file(out / shard)
    rec_path.write_text(json.dumps(rec))
    r = CliRunner().invoke(main, ["verify", str(out), "--recompute", "5"])
    assert r.exit_code == 1
    assert "RECOMPUTE" in r.output and "sample 2 " in r.output and "features/p4" in r.output


def test_ctrl_c_says_what_was_kept_and_how_to_continue(tmp_path):
    import os

    data = image_folder(tmp_path / "data", n=12)
    out = tmp_path / "s.zarr"
    args = ["extract", *folder_flags(data, "--shard-size", "1", "--batch-size", "1", "--out", str(out), "--overwrite")]
    proc = subprocess.Popen([sys.executable, "-m", "fcache", *args], stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / "ledger" / "done").glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    done = len(list((out / "ledger" / "done").glob("*.json")))
    assert last.startswith(f"Interrupted: {done} of 12 units of {out} are committed and kept; continue with: fcache extract ")
    assert "--overwrite" not in last and "Traceback" not in err and 2 <= done < 12
    again = last.split("continue with: fcache ")[1].split(" ")
    r = subprocess.run([sys.executable, "-m", "fcache", *again, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["processed"] == 12 - done and fstore.verify(out).ok
