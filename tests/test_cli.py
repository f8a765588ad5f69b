"""The command line: help lists only built commands, bad input is one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

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
