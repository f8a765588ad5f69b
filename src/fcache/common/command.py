"""The command line this process was started with, as a user would retype it."""

from __future__ import annotations

import shlex
import sys


def command_line(args: list[str], limit: int | None = 200) -> str:
    """``fcache ARGS`` shell-quoted; a line over ``limit`` keeps its start and its end (``--out`` is often last)."""
    line = shlex.join(["fcache", *args])
    if limit is None or len(line) <= limit:
        return line
    tail = limit // 3
    return f"{line[: limit - tail - 5]} ... {line[-tail:]}"


def rerun(*, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> str:
    """This command to type again, with flags ``add`` (when missing) and without the flags ``drop`` (e.g. --overwrite)."""
    args = [a for a in sys.argv[1:] if a not in drop]
    return command_line(args + [a for a in add if a not in args], limit=None)
