"""Reading records back from JSON: one check of a document against the dataclass it should make, naming the field.

Everything fcache writes to disk is a frozen dataclass with ``to_dict``/``from_dict``. Before a ``from_dict`` trusts
a document (a store's manifest, a ledger record, a RUN's config.json), :func:`check_record` walks it against the
dataclass's type hints: a missing field, a value of the wrong type, garbage, or a document nested too deep for the
JSON parser becomes one line naming the file and the dotted field, instead of a KeyError deep inside.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcache.common.errors import FcacheError


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
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))
