"""The command line: help lists only built commands, bad input is one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from fcache.cli import main


def test_help_lists_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("info", "verify"):
        assert cmd in r.output


def test_not_a_store_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fcache", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "is not an fcache store" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_path_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_importing_the_command_imports_neither_torch_nor_zarr():
    """`fcache --help` answers at once: heavy libraries are imported by the commands that use them."""
    code = "import sys, fcache.cli; heavy = {'torch', 'zarr', 'timm', 'dask'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_reads_a_store_without_importing_torch(tmp_path):
    """`fcache info` reads the manifest and the ledger only: the reader imports torch where features are read."""
    from helpers import build_store

    store = build_store(tmp_path / "s.zarr")
    code = (
        "import sys; from click.testing import CliRunner; from fcache.cli import main; "
        f"r = CliRunner().invoke(main, ['info', '--json', {str(store)!r}]); "
        "assert r.exit_code == 0, r.output; import json; assert json.loads(r.output)['samples'] > 0; "
        "assert 'torch' not in sys.modules; from fcache.store import open as o; "
        f"o({str(store)!r}).dataset(); assert 'torch' in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_flags_come_from_the_config_fields():
    """A setting is written once, as a config field: its flag, default and choices follow from it."""
    from fcache.extract.sources import SOURCES
    from fcache.store.dtypes import DTYPES
    from fcache.train_heads.tasks import TASKS

    text = CliRunner().invoke(main, ["extract", "--help"], terminal_width=200).output
    assert f"[{'|'.join(SOURCES)}]" in text and f"[{'|'.join(DTYPES)}]" in text and "--drop-degenerate-boxes" in text
    assert "--view-flip / --no-view-flip" in text and "[default: p2,p3,p4,p5]" in text
    text = CliRunner().invoke(main, ["train-head", "--help"], terminal_width=200).output
    assert f"[{'|'.join(TASKS)}]" in text and "--warmup-epochs" in text and "--val-store" in text
    r = CliRunner().invoke(main, ["extract", "--dataset", "coco", "--root", ".", "--levels", "p2,p9", "--out", "x"])
    assert r.exit_code == 2 and "unknown level 'p9'" in r.output


def test_a_bug_keeps_its_traceback_while_a_user_mistake_is_one_line(tmp_path, monkeypatch):
    from fcache.common.errors import InputError
    from fcache.store import info

    def broken(path, storage_options=None):
        raise ValueError("an internal bug")

    monkeypatch.setattr(info, "describe", broken)
    r = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError) and not isinstance(r.exception, InputError)

    def refused(path, storage_options=None):
        raise InputError(f"{path} is not what fcache wants; do this instead")

    monkeypatch.setattr(info, "describe", refused)
    r = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: {tmp_path} is not what fcache wants; do this instead"


def test_device_means_one_thing_in_every_command():
    """Every command that runs a model takes --device with the same choices, defaulting to auto (never a silent cpu)."""
    import inspect

    import fcache
    from fcache.common.devices import DEVICE_HELP

    commands = ("extract", "plan", "verify", "train-head", "eval", "cka", "bench", "predict", "sweep")
    for name in commands:
        (option,) = [p for p in main.commands[name].params if "--device" in getattr(p, "opts", ())]
        assert DEVICE_HELP in (option.help or ""), name
        assert option.default == ("" if name == "sweep" else "auto"), name  # sweep: the SPEC's device key, else auto
    assert inspect.signature(fcache.load).parameters["device"].default == "auto"


def test_every_commands_options_are_its_configs_flags():
    """A command's options are the flags of its config classes (their names, defaults and choices): no command writes an
    option of its own but --json (and the few that are not settings: extract's --out, train-head's repeatable --head)."""
    from fcache.apps.bench import BenchConfig
    from fcache.apps.config import FORMATS, DemoConfig, ExportConfig, PredictConfig
    from fcache.common.flags import flags_of
    from fcache.extract.config import BackboneCompute, ExtractConfig, PlanConfig
    from fcache.spec import SourceConfig
    from fcache.store.config import CopyConfig, ExportWdsConfig, InfoConfig, RecodeConfig, VerifyConfig
    from fcache.train_heads.config import CkaConfig, EvalConfig, ReportConfig, RunsConfig, SweepConfig, TrainConfig

    configs = {
        "info": (InfoConfig,), "verify": (VerifyConfig, BackboneCompute), "copy": (CopyConfig,), "recode": (RecodeConfig,),
        "export-wds": (ExportWdsConfig,), "extract": (SourceConfig, ExtractConfig), "plan": (SourceConfig, ExtractConfig, PlanConfig),
        "train-head": (TrainConfig,),
        "eval": (EvalConfig,), "predict": (PredictConfig,), "export": (ExportConfig,), "sweep": (SweepConfig,),
        "report": (ReportConfig,), "runs": (RunsConfig,), "demo": (DemoConfig,), "cka": (CkaConfig,), "bench": (BenchConfig,),
    }  # fmt: skip
    own = {"extract": {"--out", "--config"}, "train-head": {"--config"}, "plan": {"--out"}}
    skipped = {"plan": {"--overwrite", "--cluster", "--scheduler", "--no-space-check"}}
    assert set(configs) == set(main.commands)
    for name, classes in configs.items():
        options = {p.opts[0] for p in main.commands[name].params if isinstance(p, click.Option)} - {"--json", "--help"}
        flags = {fl.option(f.name) for cls in classes for f, fl in flags_of(cls)} - skipped.get(name, set())
        assert options == flags | own.get(name, set()), name
    defaults = {p.name: p.default for p in main.commands["predict"].params}
    assert defaults["batch_size"] == PredictConfig.batch_size and defaults["score_thr"] == PredictConfig.score_thr
    (fmt,) = [p for p in main.commands["export"].params if p.name == "format"]
    assert tuple(fmt.type.choices) == FORMATS and fmt.default == "pt2"
