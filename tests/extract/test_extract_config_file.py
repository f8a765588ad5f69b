"""`fcache extract --config FILE`: the dataset, model and store settings from YAML or JSON, flags beside it overriding
it; a bad file is one line naming it and the key, exit 2, no store created."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fcache.cli import main
from fcache.store import open as open_store
from helpers import refused
from media import image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("config") / "images", n=2)


def test_an_extract_config_file_makes_the_store_its_flags_would(folder, tmp_path):
    (tmp_path / "extract.yaml").write_text(
        f"dataset: folder\nroot: {folder}\nrandom-init: true\ninput_size: 96\nlevels: [p4, p5]\nview-flip: false\n"
        "num_workers: 0\ndevice: cpu\nseed: 7\n"
    )
    r = CliRunner().invoke(main, ["extract", "--config", str(tmp_path / "extract.yaml"), "--input-size", "64", "--out",
                                  str(tmp_path / "s.zarr"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = open_store(tmp_path / "s.zarr").manifest
    assert (m.backbone.input_size, [lv.name for lv in m.levels], m.preprocessing.seed) == (64, ["p4", "p5"], 7)  # the flag won
    assert m.dataset.kind == "folder" and m.dataset.n == 2 and json.loads(r.stdout)["processed"] == 2
    (tmp_path / "out.json").write_text(json.dumps({"out": str(tmp_path / "t.zarr"), "dataset": "folder", "root": str(folder)}))
    r = CliRunner().invoke(main, ["extract", "--config", str(tmp_path / "out.json"), "--shard-size", "0"])
    refused(r, "--shard-size 0: must be at least 1")  # not "Missing option '--out'": the file gave it
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("dataset: cocoo\n", "bad.yaml: dataset 'cocoo': unknown; choose one of: coco"),
        ("levels: [p3, p9]\n", "bad.yaml: levels: unknown level 'p9'"),
        ("view_scale: [2, 1, 0]\n", "bad.yaml: view_scale: '2,1,0': expected LO,HI"),
        ("shard-size: 0\n", "bad.yaml: shard-size 0: must be at least 1"),
        ("decode_timeout: -1\n", "bad.yaml: decode_timeout -1: must be greater than 0"),
        ("batchsize: 4\n", "bad.yaml: unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ],
)
def test_a_bad_extract_config_is_one_line_and_no_store_is_created(text, fragment, folder, tmp_path):
    (tmp_path / "bad.yaml").write_text(text)
    args = ["extract", "--config", str(tmp_path / "bad.yaml"), "--dataset", "folder", "--root", str(folder), "--out", str(tmp_path / "s")]
    refused(CliRunner().invoke(main, args), fragment)
    assert not (tmp_path / "s").exists()


def test_the_required_flags_of_extract_may_come_from_either(folder, tmp_path):
    (tmp_path / "partial.yaml").write_text(f"root: {folder}\n")
    r = CliRunner().invoke(main, ["extract", "--config", str(tmp_path / "partial.yaml"), "--out", str(tmp_path / "s")])
    refused(r, "Missing option '--dataset' (give it, or dataset: in", "partial.yaml")
    assert not (tmp_path / "s").exists()
