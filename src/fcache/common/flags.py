"""Settings declared once: a config dataclass field carries its command-line flag (help, choices, parser).

``cli.py`` turns the fields of a config class into click options (``fcache.cli.options_of``) and the parsed flags
back into the config (:func:`from_flags`), so a setting is written in one place: its field. Choices may be a
table named as ``"module:TABLE"`` (its keys), so a command's table of choices (datasets, dtypes, tasks) is imported
only when that command needs it and lower layers can name a table of a higher one without importing it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

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

    def option(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")

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
