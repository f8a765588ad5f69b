"""`fcache train-head --config FILE`: settings from YAML or JSON (keys the flags' names, with underscores or dashes; a RUN's
config.json works as one), flags beside the file overriding it; a bad file is one line naming it and the key, exit 2,
nothing created."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from clshelpers import build_label_store

from fcache.cli import main
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["--num-workers", "0", "--device", "cpu", "--logger", "none", "--json"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_label_store(tmp_path_factory.mktemp("config") / "labels.zarr", n=8)


def train(*args: str):
    return CliRunner().invoke(main, ["train-head", *args])


def recorded(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())["config"]
    return {k: v for k, v in config.items() if k != "out"}


def test_a_config_file_trains_as_its_flags_would_and_flags_beside_it_win(store, tmp_path):
    flags = ["--store", str(store), "--task", "classification", "--head", "linear", "--iters", "2", "--batch-size", "4", "--lr", "0.01",
             "--warmup", "1", "--eval-every", "2", "--val-store", str(store), "--no-keep-best"]  # fmt: skip
    r = train(*flags, "--out", str(tmp_path / "flags"), *QUIET)
    assert r.exit_code == 0, r.output
    yaml_file = tmp_path / "run.yaml"  # underscores, dashes, YAML's 1e-2 as text, a list for a repeatable flag
    yaml_file.write_text(f"store: {store}\ntask: classification\nhead: [linear]\niters: 2\nbatch-size: 4\nlr: 1e-2\nwarmup: 1\n"
                         f"eval_every: 2\nval-store: {store}\nkeep-best: false\nseed: 5\n")  # fmt: skip
    r = train("--config", str(yaml_file), "--seed", "0", "--out", str(tmp_path / "yaml"), *QUIET)
    assert r.exit_code == 0, r.output
    assert recorded(tmp_path / "yaml") == recorded(tmp_path / "flags")  # --seed 0 beside the file won over its seed: 5
    json_file = tmp_path / "run.json"
    spec = {"store": str(store), "task": "classification", "head": "linear", "iters": 3, "batch-size": 4, "out": "ignored"}
    json_file.write_text(json.dumps(spec))
    r = train("--config", str(json_file), "--out", str(tmp_path / "json"), *QUIET)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["iters"]["total"] == 3 and recorded(tmp_path / "json")["iters"] == 3


def test_a_runs_config_json_repeats_the_run(store, tmp_path):
    first = tmp_path / "first"
    r = train("--store", str(store), "--task", "classification", "--head", "linear", "--epochs", "1", "--warmup-epochs", "0.5",
              "--batch-size", "4", "--out", str(first), *QUIET)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = train("--config", str(first / "config.json"), "--out", str(tmp_path / "again"), *QUIET)
    assert r.exit_code == 0, r.output
    assert recorded(tmp_path / "again") == recorded(first)  # lengths in epochs, resolved again to the same iterations
    assert recorded(first)["iters"] == 2 and recorded(first)["warmup"] == 1
    r = train("--config", str(first / "config.json"), *QUIET)  # its out: the same folder, which holds this run already
    refused(r, f"{first} already holds this run", "--resume")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("lrr: 0.1\n", ("bad.yaml: unknown key 'lrr' (did you mean 'lr'?)",)),
        ("lr: fast\n", ("bad.yaml: lr: 'fast' is not a number",)),
        ("lr: 0\n", ("bad.yaml: lr 0: must be greater than 0",)),
        ("iters: 2.5\n", ("bad.yaml: iters: 2.5 is not an integer",)),
        ("keep_best: maybe\n", ("bad.yaml: keep_best: 'maybe' is not true or false",)),
        ("task: captioning\n", ("bad.yaml: task 'captioning': unknown; choose one of: detection",)),
        ("eval-every: often\n", ("bad.yaml: eval-every: --eval-every often: use N (iterations) or Ne (epochs)",)),
        ("lr_steps: [0.5, 2]\n", ("bad.yaml: lr_steps [0.5, 2]: must be at most 1",)),
        ("- lr\n", ("bad.yaml must hold a mapping of settings",)),
        ("lr: [1\n", ("bad.yaml is not a readable YAML or JSON file",)),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key_and_nothing_is_created(text, fragments, store, tmp_path):
    (tmp_path / "bad.yaml").write_text(text)
    args = ["--store", str(store), "--task", "classification", "--head", "linear", "--iters", "1", "--out", str(tmp_path / "run")]
    refused(train("--config", str(tmp_path / "bad.yaml"), *args, *QUIET), *fragments)
    assert not (tmp_path / "run").exists()


def test_required_flags_may_come_from_the_file_or_the_command_line(store, tmp_path):
    (tmp_path / "partial.yaml").write_text("task: classification\niters: 1\n")
    r = train("--config", str(tmp_path / "partial.yaml"), "--store", str(store), "--out", str(tmp_path / "run"), *QUIET)
    refused(r, "Missing option '--head' (give it, or head: in", "partial.yaml")
    r = train("--store", str(store), "--out", str(tmp_path / "run"), *QUIET)
    refused(r, "Missing option '--head'.")
    assert not (tmp_path / "run").exists()
