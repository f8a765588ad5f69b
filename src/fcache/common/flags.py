"""Settings declared once: a config dataclass field carries its command-line flag (help, choices, parser).

``cli.py`` turns the fields of a config class into click options (``fcache.commandline.options_of``) and the parsed flags
back into the config (:func:`from_flags`), so a setting is written in one place: its field. The same fields read
settings from files: ``--config FILE`` (:func:`read_settings`) and the keys of a sweep's SPEC (:func:`setting_value`).
Choices may be a table named as ``"module:TABLE"`` (its keys), so a command's table of choices (datasets, dtypes,
tasks) is imported only when that command needs it and lower layers can name a table of a higher one without
importing it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fcache.common.errors import InputError

T = TypeVar("T")


# What a path flag must name (the command line checks it, as click's Path type does): an existing file, a file to write
# (not a folder), a folder (not a file), a store (a folder that exists, or a URL), a store to create (or resume).
PATHS = ("file", "new-file", "folder", "store", "new-store")


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
    path: str = ""  # a path the command line checks: one of PATHS

    def __post_init__(self) -> None:
        if self.path and self.path not in PATHS:
            raise ValueError(f"path={self.path!r}: one of {', '.join(PATHS)}")

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


def setting_value(field: dataclasses.Field, hint: Any, value: Any) -> Any:
    """The value of the setting ``field`` (type ``hint``) written as ``value`` in a YAML or JSON file: numbers as the
    hint says (YAML reads ``3e-4`` as text), lists as tuples, text through the flag's parser; null for a setting that is
    None until set. InputError saying what the value should be (the caller names the file and key)."""
    fl = field.metadata.get("flag")
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional or field.default is None:
            return None
        raise InputError("null is not a value of this setting")
    if fl is not None and fl.parse is not None:  # text the flag parses: a list is its comma-separated items
        text = ",".join(map(str, value)) if isinstance(value, list) else value
        if isinstance(text, bool) or not isinstance(text, str | int | float):
            raise InputError(f"{value!r} is not text")
        return fl.parse(str(text))
    try:
        return _typed(base, value)
    except (TypeError, ValueError, OverflowError):
        kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise InputError(f"{value!r} is not {kinds.get(base, 'a list of numbers')}") from None


def _typed(hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = value if isinstance(value, list) else [value]
        return tuple(_typed(args[0] if len(args) == 1 else args[k], v) for k, v in enumerate(items))
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise ValueError
        return value
    if isinstance(value, bool):
        raise ValueError
    if hint is int:
        if float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    return float(value) if hint is float else value


def settings_of(classes: Sequence[type]) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The settings of config ``classes`` by the keys a file may give them: each field's name, and its flag's name (with
    dashes or underscores, e.g. ``dataset`` for ``kind``, ``view-flip``); the values (field, type hint)."""
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or dataclasses.is_dataclass(hints[f.name]):
                continue
            fl = f.metadata.get("flag")
            names = {f.name, f.name.replace("_", "-")} | ({fl.option(f.name).lstrip("-")} if fl is not None else set())
            out |= {n: (f, hints[f.name]) for n in names | {n.replace("-", "_") for n in names}}
    return out


def read_settings(
    path: str | Path, classes: Sequence[type], document: Callable[[Any], Any] | None = None, lists: Sequence[str] = ()
) -> dict[str, Any]:
    """The settings a ``--config`` file gives, by field name: a YAML or JSON mapping whose keys are the settings of
    ``classes`` (see :func:`settings_of`), each value checked as its flag checks it. ``document`` may first pick the
    settings out of a document of another shape (a RUN's config.json); a setting named in ``lists`` (a flag given once
    per value, as ``--head``) may be a list of values, read as a tuple.

    Raises:
        InputError: one line naming the file and the key: not a mapping, an unknown key, a bad value.
    """
    import yaml

    try:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise InputError(f"{path} is not a readable YAML or JSON file ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    data = document(data) if document is not None and isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of settings (the flags' names, e.g. lr: 0.001)")
    known = settings_of(classes)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{path}: unknown key {key!r}{hint}; the keys are the flags' names without their dashes (see --help)")
        field, hint = known[key]
        several = field.name in lists and isinstance(value, list)
        values = [_checked(path, key, field, hint, v) for v in (value if several else [value])]
        out[field.name] = tuple(values) if several else values[0]
    return out


def _checked(path: str | Path, key: str, field: dataclasses.Field, hint: Any, value: Any) -> Any:
    """One setting's value from a file, checked as its flag would check it (InputError naming the file and the key)."""
    try:
        typed = setting_value(field, hint, value)
    except InputError as e:
        raise InputError(f"{path}: {key}: {e}") from None
    fl = field.metadata.get("flag")
    why = fl.problem(typed) if fl is not None and typed is not None else ""
    if fl is not None and fl.values() is not None and typed not in (fl.values() or ()):
        why = f"unknown; choose one of: {', '.join(fl.values() or ())}"
    if why:
        raise InputError(f"{path}: {key} {value!r}: {why}")
    return typed
