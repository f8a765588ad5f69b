"""Settings declared once: a config dataclass field carries its command-line flag (help, choices, parser).

``cli.py`` turns the fields of a config class into click options (``fcache.cli.options_of``) and the parsed flags
back into the config (:func:`from_flags`), so a setting is written in one place: its field. Choices may be a
table named as ``"module:TABLE"`` (its keys), so a command's table of choices (datasets, dtypes, tasks) is imported
only when that command needs it and lower layers can name a table of a higher one without importing it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fcache.common.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line. ``name`` defaults to ``--field-name``."""

    help: str
    name: str = ""
    choices: Iterable[str] | str | None = None  # the values, or "module:TABLE" whose keys are (imported when needed)
    parse: Callable[[str], Any] | None = None  # text -> field value (the default is given as text too)
    text_default: str | None = None  # the default as typed on the command line, when ``parse`` is given
    show_default: bool | str = True
    secondary: str = ""  # for booleans that default to True: the flag that turns them off (e.g. --no-view-flip)
    min: float | None = None  # numbers: the smallest value allowed
    above: float | None = None  # numbers: values must be greater than this
    max: float | None = None  # numbers: the largest value allowed
    below: float | None = None  # numbers: values must be less than this

    def option(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")

    def problem(self, value: Any) -> str:
        """What is wrong with ``value`` for this flag ('' when nothing): numbers finite and in range, choices known."""
        numbers = value if isinstance(value, tuple) else (value,)
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if not math.isfinite(v):
                return "must be a finite number"
            if self.min is not None and v < self.min:
                return f"must be at least {self.min:g}"
            if self.above is not None and v <= self.above:
                return f"must be greater than {self.above:g}"
            if self.max is not None and v > self.max:
                return f"must be at most {self.max:g}"
            if self.below is not None and v >= self.below:
                return f"must be less than {self.below:g}"
        return ""

    def values(self) -> tuple[str, ...] | None:
        """The allowed values (a named table is imported here), or None for any."""
        if self.choices is None:
            return None
        if isinstance(self.choices, str):
            module, _, attr = self.choices.partition(":")
            return tuple(getattr(importlib.import_module(module), attr))
        return tuple(self.choices)


def flag(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and its command-line flag (see :class:`Flag`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults need a default_factory")
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **kw)})


def required(help: str, **kw: Any) -> Any:
    """A dataclass field without a default whose flag is required."""
    return dataclasses.field(metadata={"flag": Flag(help, **kw)})


def check_flags(config: Any) -> None:
    """Refuse a config whose flag fields hold values their flags do not allow (one line naming the flag and the fix).

    Called by each config's ``__post_init__``, so Python callers get the same checks as the command line.
    """
    for f, fl in flags_of(type(config)):
        value = getattr(config, f.name)
        if value is None:
            continue
        why = fl.problem(value)
        if why:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise InputError(f"{fl.option(f.name)} {shown}: {why}")


def flags_of(cls: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of ``cls`` that are command-line flags, in declaration order (those of base classes last)."""
    own = getattr(cls, "__annotations__", {})
    fields = [f for f in dataclasses.fields(cls) if "flag" in f.metadata]
    return [(f, f.metadata["flag"]) for f in sorted(fields, key=lambda f: f.name not in own)]


def from_flags(cls: type[T], kw: Mapping[str, Any], **nested: Any) -> T:
    """An instance of ``cls`` from flag values named like its fields (unknown keys ignored, absent ones defaulted).

    ``nested`` gives fields that are themselves configs (e.g. ``source=SourceConfig(...)``).
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in kw.items() if k in names}, **nested)


def split_csv(text: str) -> tuple[str, ...]:
    """``"a,b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
