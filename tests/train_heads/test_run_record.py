"""A RUN describes itself (backbone, preprocessing, dataset, provenance), its files are readable like any other, a store
of another backbone is refused by eval, and each evaluation store keeps its own results, shown by `fcache report`."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from fcache import store as fstore
from fcache.cli import main
from fcache.train_heads.checkpoints import RECORD_KEY
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.runrecord import TrainingRecord
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--num-workers", "0", "--device", "cpu", "--json"]
TRAIN = ["--head", "fpn:channels=8,rois=8,rpn_batch=8", "--iters", "2", "--batch-size", "1", "--warmup", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def run(det_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("record") / "run"
    r = CliRunner().invoke(main, ["train-head", "--store", str(det_store), "--out", str(out), *TRAIN, *QUICK])
    assert r.exit_code == 0, r.output
    return out


def copy_store(src: Path, dst: Path, **backbone) -> Path:
    """A copy of a store whose manifest says its features come from another backbone (``backbone`` fields replaced)."""
    shutil.copytree(src, dst)
    meta = dst / "zarr.json"
    doc = json.loads(meta.read_text())
    manifest = doc["attributes"]["fcache"]
    for key, value in backbone.items():
        section = "preprocessing" if key in ("seed", "mean", "std") else "backbone"
        manifest[section][key] = value
    meta.write_text(json.dumps(doc))
    return dst


def test_config_records_everything_that_rebuilds_the_backbone(run, det_store):
    config = json.loads((run / "config.json").read_text())
    m = fstore.open(det_store).manifest
    features = TrainingRecord.from_dict(config).require_features()
    assert (features.backbone, features.preprocessing, features.dataset) == (m.backbone, m.preprocessing, m.dataset)
    assert config["task"]["categories"] == [dict(c) for c in fstore.open(det_store).target_attrs["categories"]]
    assert {"torch", "timm", "torchvision"} <= set(config["libraries"]) and config["command"]
    assert {"name", "platform", "python", "cpus", "gpus"} <= set(config["host"]) and config["host"]["name"]
    assert config["fcache_version"] and config["trainable_params"] > 0
    record = TrainingRecord.from_dict(config)
    assert json.loads(json.dumps(record.to_dict())) == config  # a frozen record that round-trips
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[RECORD_KEY]) == config  # the weights file says what it is


def test_run_files_are_readable_as_the_umask_allows(run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "model.safetensors", "checkpoint-2.pt", "metrics.jsonl", "metrics.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~mask, name


def test_old_runs_without_a_backbone_record_still_load_and_malformed_ones_are_refused(run, tmp_path):
    config = json.loads((run / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("features", "command", "libraries", "host")}
    assert TrainingRecord.from_dict(old).features is None
    bad = {
        "features.backbone is 1 (a number), not a JSON object": {"features": {"backbone": 1}},
        "features": {"features": {}},
        "command": {"command": "fcache"},
        "RUN format 99 is newer than this fcache reads (1); upgrade fcache": {"format_version": 99},
    }
    for field, change in bad.items():
        folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(ValueError, match=r"config\.json[: ]") as e:
            RunDir(folder).read_config()
        assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timm_name": "swinv2_small_window16_256.ms_in1k", "alias": "swinv2-s"}, "model"),
        ({"seed": 7}, "seed"),
        ({"weights": "0" * 64}, "weights"),
        ({"mean": [0.5, 0.5, 0.5]}, "mean"),
        ({"input_size": 256}, None),  # the arrays' shapes then contradict the manifest: refused as damaged before
    ],
)
def test_eval_refuses_features_of_another_backbone(run, det_store, tmp_path, change, field):
    other = copy_store(det_store, tmp_path / "other.zarr", **change)
    r = CliRunner().invoke(main, ["eval", str(run), "--store", str(other), *QUICK])
    if field is None:
        refused(r, "the manifest says", "the store was edited or damaged")
    else:
        refused(r, "holds features of another backbone", f"{field}: ")
    assert not (run / "eval" / "other").exists()


def test_each_evaluation_store_keeps_its_own_results_and_report_names_it(run, det_store, tmp_path):
    twin = tmp_path / "a" / det_store.name  # the same name, elsewhere, with other samples (another fingerprint)
    from dethelpers import OBJECTS, build_detection_store

    build_detection_store(twin, objects=OBJECTS[:1])
    results = {}
    for store in (det_store, twin, det_store):
        r = CliRunner().invoke(main, ["eval", str(run), "--store", str(store), *QUICK])
        assert r.exit_code == 0, r.output
        results[str(store)] = json.loads(r.stdout)
    folders = sorted(p.name for p in (run / "eval").iterdir())
    fp = fstore.open(twin).manifest.fingerprint
    assert folders == ["train", f"train-{fp[:8]}"]
    for store, summary in results.items():
        d = Path(summary["out"])
        assert json.loads((d / "store.json").read_text())["path"] == str(Path(store).absolute())
        assert json.loads((d / "metrics.json").read_text())["metrics"] == summary["metrics"]
        assert (d / "detections.json").is_file()
    assert not (run / "detections.json").exists()

    rep = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "rep"), "--json"])
    assert rep.exit_code == 0, rep.output
    rows = json.loads(rep.stdout)["rows"]
    assert sorted(r["eval_store"] for r in rows) == sorted([str(det_store), str(twin)])
    for row in rows:
        assert row["box/AP"] == results[row["eval_store"]]["metrics"]["box/AP"]
    assert "eval store" in (tmp_path / "rep" / "results.md").read_text()
