"""Will the store fit? ``fcache plan`` shows the estimate against the free space of ``--out``; ``fcache extract`` refuses
to start (exit code 2, one line with the numbers and the smaller alternatives, nothing created) when it does not fit."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
from click.testing import CliRunner

from fcache.cli import main
from fcache.extract import space
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import prepare
from fcache.store import layout
from helpers import refused
from media import image_folder

Usage = namedtuple("Usage", "total used free")
BASE = dict(model="swinv2-t", random_init=True, input_size=128, num_workers=0, device="cpu")
PER_SAMPLE = 2 * (96 * 32 * 32 + 192 * 16 * 16 + 384 * 8 * 8 + 768 * 4 * 4)  # swinv2-t at 128 px, fp16, p2..p5: 368,640 B
P345 = 2 * (192 * 16 * 16 + 384 * 8 * 8 + 768 * 4 * 4)
INT8 = PER_SAMPLE // 2 + 4 * (96 + 192 + 384 + 768)  # int8 values and a float32 scale per channel
INT4 = PER_SAMPLE // 4 + 2 * (96 + 192 + 384 + 768)  # two int4 values per byte and a 16-bit scale per channel


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig.from_flags(**{**BASE, **kw})


def folder_flags(root, *extra: str) -> list[str]:
    return ["--dataset", "folder", "--root", str(root), "--random-init", "--input-size", "128", "--num-workers", "0", "--device", "cpu",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("space") / "data", n=5)


def free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The filesystem reports ``free`` bytes free (shutil.disk_usage is what fcache asks)."""
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: Usage(10 * free + 1, 9 * free + 1, free))


def test_sizes_and_alternatives_follow_the_plan_arithmetic(folder):
    _, _, _, manifest = prepare(cfg(dataset="folder", root=str(folder)), meta=True)
    assert space.level_bytes(manifest) == {"p2": 2 * 96 * 32 * 32, "p3": 2 * 192 * 16 * 16, "p4": 2 * 384 * 8 * 8, "p5": 2 * 768 * 4 * 4}
    assert sum(space.level_bytes(manifest, "int8").values()) == INT8
    assert space.alternatives(manifest, 5, None) == {"--levels p3,p4,p5": 5 * P345, "--dtype int8": 5 * INT8, "--dtype int4": 5 * INT4}
    assert space.alternatives(manifest, 5, 2.0) == {
        "--levels p3,p4,p5": 5 * P345 // 2,
        "--dtype int8": 5 * INT8 // 2,
        "--dtype int4": 5 * INT4 // 2,
    }
    assert space.needed("", manifest).bytes == 5 * PER_SAMPLE
    assert space.free_bytes("s3://bucket/store.zarr") is None  # object storage: not checked


def test_extract_refuses_a_store_bigger_than_the_free_space(folder, tmp_path, monkeypatch):
    free_space(monkeypatch, 5 * PER_SAMPLE - 1)
    out = tmp_path / "deep" / "s.zarr"
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--shard-size", "2", "--out", str(out))])
    refused(r, f"--out {out} needs about 1.8 MB (uncompressed", "for 5 samples but its filesystem has 1.8 MB free",
            "--levels p3,p4,p5 needs about 860.2 KB", "--dtype int8 needs about 950.4 KB", "--dtype int4 needs about 475.2 KB",
            "--no-space-check")  # fmt: skip
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing created, not even the parent
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--shard-size", "2", "--out", str(out), "--no-space-check")])
    assert r.exit_code == 0, r.output
    assert len(list(layout.ledger_dir(out, "done").glob("*.json"))) == 3


def test_a_resumed_store_needs_only_its_uncommitted_units(folder, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--shard-size", "2", "--out", str(out), "--codec", "none")])
    assert r.exit_code == 0, r.output
    layout.done_path(out, layout.units(5, 2)[1]).unlink()  # samples 2-3 to do again
    _, _, _, manifest = prepare(cfg(dataset="folder", root=str(folder), shard_size=2, codec="none", out=str(out)), meta=True)
    need = space.needed(str(out), manifest)
    assert need.samples == 2 and need.raw == 2 * PER_SAMPLE and need.measured_on == "3 committed samples"
    assert need.ratio == pytest.approx(1.0, abs=0.01)  # no codec: on disk as raw
    assert space.needed(str(out), manifest, overwrite=True).raw == 5 * PER_SAMPLE
    free_space(monkeypatch, 3 * PER_SAMPLE)  # too little for the whole store, enough for what is left
    r = CliRunner().invoke(main, ["extract", *folder_flags(folder, "--shard-size", "2", "--out", str(out), "--codec", "none")])
    assert r.exit_code == 0, r.output
    assert "extracted 2 of 5 samples" in r.output


def test_plan_shows_totals_free_space_and_the_assumption_of_its_time(folder, tmp_path, monkeypatch):
    free_space(monkeypatch, 2 * PER_SAMPLE)
    r = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--no-run", "--out", str(tmp_path / "s.zarr"), "--json")])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert (p["total_bytes"], p["needed_bytes"], p["free_bytes"]) == (5 * PER_SAMPLE, 5 * PER_SAMPLE, 2 * PER_SAMPLE)
    assert p["alternatives"] == {"--levels p3,p4,p5": 5 * P345, "--dtype int8": 5 * INT8, "--dtype int4": 5 * INT4}
    assert p["estimate"] == "flops" and p["seconds_per_image"] == pytest.approx(p["gflops_per_image"] * 1e9 / 100e12)
    text = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--no-run", "--out", str(tmp_path / "s.zarr"))]).output
    assert "whole dataset: 5 samples x 1 views x 4 levels = 1.8 MB uncompressed" in text
    assert "smaller: --levels p3,p4,p5 860.2 KB, --dtype int8 950.4 KB, --dtype int4 475.2 KB" in text
    assert "or a budget: --max-error 0.1 stores each level in its smallest form within that relative RMSE" in text
    assert f"free space at {tmp_path / 's.zarr'}: 737.3 KB; extract needs 1.8 MB (uncompressed" in text and "NOT enough" in text
    assert "assumed 100 TFLOP/s sustained: no throughput measured for swinv2-t @ 128 on h100" in text
    assert not (tmp_path / "s.zarr").exists()


def test_plan_times_a_measured_model_from_its_throughput(folder):
    r = CliRunner().invoke(main, ["plan", *folder_flags(folder, "--no-run", "--json", "--model", "swinv2-l", "--input-size", "1024")])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["estimate"] == "throughput table" and p["seconds_per_image"] == pytest.approx(1 / 7.25)
    assert p["total_seconds"] == pytest.approx(5 / 7.25) and p["throughput"]["forward_img_s"] == 10.2


def test_disk_usage_is_asked_of_the_nearest_existing_folder(tmp_path, monkeypatch):
    asked, real = [], shutil.disk_usage
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: asked.append(path) or real(tmp_path))
    space.free_bytes(str(tmp_path / "a" / "b" / "s.zarr"))
    assert asked == [tmp_path]
