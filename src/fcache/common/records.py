"""Records on disk: frozen dataclasses read and written by one generic path from their type hints, with migrations.

Everything fcache writes to disk (a store's manifest, a ledger record, a RUN's config.json, an evaluation's
metrics.json) is a frozen dataclass deriving from :class:`Record`: :func:`to_dict` turns it into JSON values (nested
records as objects, tuples as lists) and :func:`from_dict` reads it back in three steps: a document of an earlier
format is migrated (``Record.FORMAT``: the version the class writes into ``format_version`` and the table of
migrations of older documents), checked against the type hints (:func:`check_record`: a missing field, a value of the
wrong type, garbage, or a document nested too deep for the JSON parser becomes one line naming the file and the
dotted field, instead of a KeyError deep inside), then built (lists become the tuples the hints say, numbers the
floats, objects the nested records). A value the class itself refuses (its ``__post_init__``) is one line too.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from fcache.common.errors import FcacheError, InputError

R = TypeVar("R", bound="Record")
VERSION_FIELD = "format_version"
Document = dict[str, Any]


@dataclass(frozen=True)
class Migration:
    """One change of a record's layout: a document of format ``version`` or older passes through ``change``.

    ``change`` gets the raw document (checked only after every migration) and returns it in the later layout; it is
    given every document of that version, so it leaves one that already has the later layout as it is.
    """

    version: int
    change: Callable[[Document], Document]


@dataclass(frozen=True)
class Format:
    """How a record is versioned on disk: the ``format_version`` it writes, the versions it reads, its migrations.

    ``refused`` is the message for a version outside ``oldest``..``version`` (``{version}``, ``{current}``); a document
    without ``format_version`` is of version ``missing``.
    """

    version: int
    refused: str
    oldest: int | None = None  # None: every earlier version is read
    missing: int | None = None  # None: ``version``
    migrations: tuple[Migration, ...] = ()

    def problem(self, version: int) -> str:
        """Why a document of ``version`` cannot be read ('' when it can)."""
        if version > self.version or (self.oldest is not None and version < self.oldest):
            return self.refused.format(version=version, current=self.version)
        return ""

    def migrate(self, d: Document, where: str, error: type[FcacheError]) -> Document:
        """``d`` in today's layout (unchanged when its version is not an integer: the check names it)."""
        version = d.get(VERSION_FIELD, self.version if self.missing is None else self.missing)
        if not isinstance(version, int) or isinstance(version, bool):
            return d
        problem = self.problem(version)
        if problem:
            raise error(f"{where}: {problem}")
        for m in self.migrations:
            if version <= m.version:
                d = m.change(d)
        return d


def fill(**absent: Any) -> Callable[[Document], Document]:
    """A migration giving a document the fields it lacks (written before they were recorded) their values then."""

    def change(d: Document) -> Document:
        return {**absent, **d}

    return change


def renamed(old: str, new: str, inside: str = "") -> Callable[[Document], Document]:
    """A migration reading the field ``old`` (of the object ``inside``, when given) as ``new``, unless both are there."""

    def change(d: Document) -> Document:
        target = d.get(inside) if inside else d
        if not isinstance(target, dict) or old not in target or new in target:
            return d
        moved = {new if k == old else k: v for k, v in target.items()}
        return {**d, inside: moved} if inside else moved

    return change


class Record:
    """A frozen dataclass kept on disk as JSON (``to_dict`` / ``from_dict`` by the generic path of this module).

    A class says, as class attributes: ``FORMAT`` (a versioned top-level record: its version and migrations),
    ``ERROR`` (what a bad document raises: a store's records StoreError, a RUN's InputError), ``UNRECORDED`` (fields
    never written, e.g. ones that may hold credentials) and ``DAMAGED`` (what to do about a document with an impossible
    value).
    """

    FORMAT: ClassVar[Format | None] = None
    ERROR: ClassVar[type[FcacheError]] = InputError
    UNRECORDED: ClassVar[tuple[str, ...]] = ()
    DAMAGED: ClassVar[str] = "it was edited or damaged"

    def to_dict(self) -> Document:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[R], d: Any, where: str = "") -> R:
        """The record of the JSON document ``d``; ``cls.ERROR`` naming ``where`` (a file) and the field when it is not one."""
        return from_dict(cls, d, where or f"the {cls.__name__} record")


def to_dict(record: Any) -> Document:
    """The JSON values of a dataclass ``record``, by field in declaration order (``UNRECORDED`` fields left out)."""
    skip = getattr(record, "UNRECORDED", ())
    return {f.name: _json(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name not in skip}


def _json(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple | list):
        return [_json(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _json(x) for k, x in v.items()}
    return v


def from_dict(cls: type[R], d: Any, where: str, error: type[FcacheError] | None = None) -> R:
    """Migrate, check and build the record ``cls`` of the JSON document ``d`` (``error``: default ``cls.ERROR``).

    Raises:
        FcacheError: one line naming ``where`` and the field: an unreadable version, a missing field, a value of the
            wrong type, or one the class refuses.
    """
    error = error or cls.ERROR
    if cls.FORMAT is not None and isinstance(d, dict):
        d = cls.FORMAT.migrate(d, where, error)
    check_record(cls, d, where, error)
    try:
        return _build(cls, d)
    except (InputError, ValueError) as e:
        raise error(f"{where} holds an impossible value ({e}); {cls.DAMAGED}") from None


def _build(cls: Any, d: Mapping[str, Any]) -> Any:
    kwargs = {}
    for name, convert in _converters(cls):
        if name in d:
            v = d[name]
            kwargs[name] = v if convert is None or v is None else convert(v)
    return cls(**kwargs)


@functools.cache
def _converters(cls: Any) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """Each init field of ``cls`` with what turns its checked JSON value into the field's value (worked out once)."""
    return tuple((f.name, _converter(hint)) for f, hint in _fields(cls) if f.init)


@functools.cache
def _converter(hint: Any) -> Callable[[Any], Any] | None:
    """What turns a (checked, not null) JSON value into a value of ``hint``; None when it is one already."""
    if hint is Any:
        return None
    hint, origin, args, optional = _shape(hint)
    convert = _plain_converter(hint, origin, args)
    if convert is None or not optional:
        return convert
    return lambda v: None if v is None else convert(v)


def _plain_converter(hint: Any, origin: Any, args: tuple[Any, ...]) -> Callable[[Any], Any] | None:
    if dataclasses.is_dataclass(hint):
        return functools.partial(_build, hint)
    if hint is tuple or hint is list:
        return hint
    if origin is tuple or origin is list:
        if set(args) <= {int, str, bool, Ellipsis}:  # nothing to convert (a unit's statuses: thousands of ints)
            return origin
        if origin is tuple and Ellipsis not in args:
            each = [_converter(h) or _same for h in args]
            return lambda v: tuple(c(x) for c, x in zip(each, v, strict=True))
        item = _converter(args[0]) or _same
        return lambda v: origin(item(x) for x in v)
    if origin is dict:
        value = _converter(args[1]) if args else None
        return dict if value is None else lambda v: {k: value(x) for k, x in v.items()}
    if hint is float:
        return float
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    return None


def _same(v: Any) -> Any:
    return v


def load_json(text: str, where: str, error: type[FcacheError], object_hook: Callable[[dict], Any] | None = None) -> Any:
    """Parse ``text`` (``object_hook`` as json's); ``error`` naming ``where`` when it is not JSON or is nested too deep."""
    try:
        return json.loads(text, object_hook=object_hook)
    except RecursionError:
        raise error(f"{where} is nested {_max_depth(text)} levels deep, deeper than JSON can be read here; it is not valid input") from None
    except ValueError as e:
        raise error(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None


def read_json(path: Path, error: type[FcacheError]) -> Any:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return load_json(text, str(path), error)


def _max_depth(text: str) -> int:
    """Deepest nesting of brackets outside strings (cheap: one pass, no recursion)."""
    depth = best = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best


def check_record(cls: type, d: Any, where: str, error: type[FcacheError], prefix: str = "") -> None:
    """``error`` naming ``where`` and the field when ``d`` does not fit the dataclass ``cls`` (extra keys are allowed)."""
    if not isinstance(d, dict):
        raise error(f"{where}: {prefix.rstrip('.') or 'the document'} is {_kind(d)}, not a JSON object")
    for f, hint in _fields(cls):
        name = prefix + f.name
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{where}: the field {name!r} is missing")
            continue
        if d[f.name] is None and f.default is None:  # a field that is None until set (e.g. a training default) may be null
            continue
        _check_value(hint, d[f.name], where, name, error)


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """A dataclass's fields with their resolved type hints (resolving them costs more than checking a record)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


@functools.cache
def _shape(hint: Any) -> tuple[Any, Any, tuple[Any, ...], bool]:
    """(hint without ``| None``, its origin, its args, whether None is allowed), resolved once per hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = False
    if origin is typing.Union or isinstance(hint, types.UnionType):
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    return hint, origin, args, optional


def _check_value(hint: Any, v: Any, where: str, name: str, error: type[FcacheError]) -> None:
    if hint is Any:
        return
    hint, origin, args, optional = _shape(hint)
    if v is None and optional:
        return
    if dataclasses.is_dataclass(hint):
        check_record(hint, v, where, error, prefix=name + ".")  # type: ignore[arg-type]
        return
    ok = _fits(hint, origin, v)
    if not ok:
        raise error(f"{where}: the field {name!r} is {_kind(v)}, not {_describe(hint)}")
    if origin in (tuple, list) and args:
        if args[-1] is Ellipsis and args[0] is int and set(map(type, v)) <= {int}:
            return  # the common long case (a unit's statuses), checked at once
        items = args if origin is tuple and Ellipsis not in args else (args[0],) * len(v)
        if origin is tuple and Ellipsis not in args and len(v) != len(args):
            raise error(f"{where}: the field {name!r} has {len(v)} values, not {len(args)}")
        for k, (h, x) in enumerate(zip(items, v, strict=True)):
            _check_value(h, x, where, f"{name}[{k}]", error)
    elif origin is dict and args:
        for k, x in v.items():
            _check_value(args[1], x, where, f"{name}.{k}", error)


def _fits(hint: Any, origin: Any, v: Any) -> bool:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return any(v == m.value and type(v) is type(m.value) for m in hint)
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if hint is str:
        return isinstance(v, str)
    if origin in (tuple, list):
        return isinstance(v, list | tuple)
    if origin is dict or hint is dict:
        return isinstance(v, dict)
    return True


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"{str(v).lower()} (a boolean)"
    if isinstance(v, int | float):
        return f"{v!r} (a number)"
    if isinstance(v, str):
        return f"{v[:40]!r} (a string)"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    return "an object" if isinstance(v, dict) else type(v).__name__


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(json.dumps(m.value) for m in hint)
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))
