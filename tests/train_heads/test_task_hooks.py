"""Every entry of TASKS provides every hook of ``TaskDef`` (and of its Outputs, ExportDef, BenchDef, Synthetic), no code
outside a task's own package asks which task it is, and an unknown task is refused rather than taken for another."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcache.cli import main
from fcache.train_heads.headspec import HeadDef
from fcache.train_heads.runfolder import CONFIG
from fcache.train_heads.task import BenchDef, ExportDef, Outputs, Synthetic, TaskDef
from fcache.train_heads.tasks import TASKS, task_def
from helpers import refused

sys.path.insert(0, str(Path(__file__).parent / "analysis"))
from runmaker import make_run  # noqa: E402

SRC = Path(__file__).parents[2] / "src" / "fcache"
HOOK_RECORDS = {"outputs": Outputs, "export": ExportDef, "bench": BenchDef}


def hooks(cls: type) -> list[str]:
    """The fields of a hook record that are callables (the hooks proper)."""
    return [f.name for f in dataclasses.fields(cls) if "Callable" in str(f.type)]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_provides_every_hook(name):
    t = TASKS[name]
    assert isinstance(t, TaskDef) and t.name == name and task_def(name) is t
    for field in dataclasses.fields(TaskDef):
        assert getattr(t, field.name) is not None, f"{name} lacks {field.name}"
    assert t.heads and all(isinstance(h, HeadDef) and callable(h.build) for h in t.heads.values())
    assert callable(t.task.from_store) and callable(t.task.from_description) and callable(t.check_eval_store)
    assert t.main_metric.partition("/")[2] in t.metric_names, f"{name}: its main metric is not among its metric names"
    assert t.eval_views in ("plain", "all") and isinstance(t.higher_is_better, bool) and isinstance(t.percent, bool)
    assert callable(t.pictures) and callable(t.per_class)
    for attr, cls in HOOK_RECORDS.items():
        record = getattr(t, attr)
        assert isinstance(record, cls), f"{name}.{attr} is not a {cls.__name__}"
        for hook in hooks(cls):
            assert callable(getattr(record, hook)), f"{name}.{attr}.{hook} is not callable"
    assert isinstance(t.bench.targets, Synthetic) and callable(t.bench.targets.specs) and callable(t.bench.targets.driver)
    assert t.export.outputs and t.bench.batch >= 1 and t.bench.input_size % 32 == 0
    t.parse(t.bench.frozen_head), t.parse(t.bench.finetune_head)  # the bench's default heads are heads of the task


def test_the_hook_records_list_what_the_test_checks():
    """A hook added to a record is a callable field, so the test above walks it too."""
    assert hooks(Outputs) == ["present", "files", "truth", "draw"]
    assert hooks(ExportDef) == ["forward", "inputs"] and hooks(BenchDef) == ["levels"]


def test_no_code_outside_a_task_package_asks_which_task_it_is():
    pattern = r"task ?== ?['\"]|task\.name ?== ?['\"]|\.task ?(==|in) "
    own = {f"train_heads/{name}/" for name in TASKS}
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if any(rel.startswith(p) for p in own):
            continue
        found += [f"{rel}:{k}: {line.strip()}" for k, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not found, "\n".join(found)
    r = subprocess.run(["git", "grep", "-nE", pattern, "--", "src/fcache/*.py"], cwd=SRC.parents[1], capture_output=True, text=True)
    if r.returncode in (0, 1):  # a git checkout: git's own grep agrees
        assert all(any(f"src/fcache/{p}" in line for p in own) for line in r.stdout.splitlines()), r.stdout


def test_an_unknown_task_is_refused_everywhere(tmp_path):
    """A RUN of a task this fcache does not know is refused by predict and export (one line, nothing written), as by
    every table of tasks; never taken for classification or detection."""
    from fcache.apps.bench import BenchConfig

    with pytest.raises(ValueError, match="unknown task 'pose'; choose one of: detection, "):
        task_def("pose")
    with pytest.raises(ValueError, match="unknown task 'pose'"):
        BenchConfig(task="pose", device="cpu")
    run = make_run(tmp_path / "run", "linear", task="classification")
    config = json.loads((run / CONFIG).read_text())
    config["config"]["task"] = "pose"
    (run / CONFIG).write_text(json.dumps(config))
    predict = ["predict", str(run), str(tmp_path), "--out", str(tmp_path / "p"), "--device", "cpu"]
    for args in (predict, ["export", str(run), "--out", str(tmp_path / "e.pt2")]):
        refused(CliRunner().invoke(main, args), "unknown task 'pose'")
    assert not (tmp_path / "p").exists() and not (tmp_path / "e.pt2").exists()
