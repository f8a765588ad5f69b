"""Head specs on the command line: ``NAME[:key=value,...]`` parsed against a table of typed parameters into typed values
(an int, a bool, a float, a choice), so heads never see text.

Shared by every task's HEADS table; a spec prints back canonically (all parameters, sorted) for config.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fcache.common.errors import InputError
from fcache.spec import LEVEL_NAMES, LevelSpec


@dataclass(frozen=True)
class Param:
    """One head parameter: its default (a value of its kind) and what text it accepts, parsed to a typed value.

    ``kind`` names a parser of ``KINDS``: ``int`` (in [``minimum``, ``maximum``]), ``bool`` (0 or 1: a bool, written
    back as 0 / 1), ``prob`` (a float in [0, 1): dropout, stochastic depth), ``positive`` (a finite float > 0: a depth
    in metres), ``choice`` (one of ``choices``) or ``levels`` (``all``, ``last`` (the coarsest stored level) or names
    joined by ``+``, e.g. ``p3+p4+p5``; a comma would end the value). A choice may bring
    parameters of its own (``options``: choice -> its parameters, e.g. a neck's), accepted beside the head's when it is
    chosen; the head's own parameter wins where both have a key.
    """

    default: Any
    kind: str = "int"
    choices: tuple[str, ...] = ()
    minimum: int = 1
    maximum: int = 1024  # a bound that keeps a typo from allocating hundreds of GB
    help: str = ""
    options: Mapping[str, Mapping[str, Param]] | None = None

    def parse(self, head: str, key: str, text: str) -> Any:
        try:
            return KINDS[self.kind](self, key, text)
        except InputError as e:
            raise InputError(f"head {head}: {e}") from None


def _int(p: Param, key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{key}={text!r} is not an integer (e.g. {key}={p.default})") from None
    if value < p.minimum:
        raise InputError(f"{key}={value} must be at least {p.minimum}")
    if value > p.maximum:
        raise InputError(f"{key}={value} must be at most {p.maximum}")
    return value


def _bool(p: Param, key: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise InputError(f"{key}={text} must be 0 or 1")
    return text == "1"


def _prob(p: Param, key: str, text: str) -> float:
    try:
        prob = float(text)
    except ValueError:
        raise InputError(f"{key}={text!r} is not a number (e.g. {key}={p.default})") from None
    if not 0 <= prob < 1:
        raise InputError(f"{key}={prob} must be in [0, 1)")
    return prob


def _positive(p: Param, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{key}={text!r} is not a number (e.g. {key}={p.default})") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{key}={value} must be a positive number")
    return value


def _choice(p: Param, key: str, text: str) -> str:
    if text not in p.choices:
        raise InputError(f"{key}={text!r} is not one of {', '.join(p.choices)}")
    return text


def _levels(p: Param, key: str, text: str) -> str:
    if text in ("all", "last"):
        return text
    names = text.split("+")
    known = set(LEVEL_NAMES.values())
    bad = [n for n in names if n not in known]
    if bad or len(set(names)) != len(names):
        raise InputError(f"{key}={text!r} must be 'all' or distinct level names joined by '+', e.g. p3+p4+p5 (or 'last')")
    return "+".join(sorted(names))


KINDS: dict[str, Callable[[Param, str, str], Any]] = {
    "int": _int,
    "bool": _bool,
    "prob": _prob,
    "positive": _positive,
    "choice": _choice,
    "levels": _levels,
}


def show(value: Any) -> str:
    """A parameter's value as a head spec writes it (a bool as 0 / 1, as specs always had it)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head: its name and every parameter (defaults filled in)."""

    name: str
    params: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{k}={show(v)}" for k, v in self.params) if self.params else "")


def select_levels(head: HeadSpec, available: Sequence[LevelSpec], minimum: int = 2) -> tuple[LevelSpec, ...]:
    """The stored levels a head reads: its ``levels`` parameter (``all`` = every stored level, fine to coarse; ``last`` =
    the coarsest stored level).

    Raises:
        ValueError: a wanted level is not stored, or fewer than ``minimum`` levels remain.
    """
    wanted = head["levels"]
    have = {lv.name: lv for lv in available}
    names = sorted(have, key=lambda n: have[n].stride) if wanted in ("all", "last") else wanted.split("+")
    names = names[-1:] if wanted == "last" else names
    missing = [n for n in names if n not in have]
    if missing:
        raise InputError(
            f"head {head.name} reads levels {', '.join(names)} but the store holds only {', '.join(have)}; "
            "pick levels=... among those, or extract the missing levels"
        )
    if len(names) < minimum:
        raise InputError(
            f"head {head.name} needs at least {minimum} feature levels and gets only {', '.join(names)}; "
            "use a store extracted with several levels (e.g. --levels p2,p3,p4,p5)"
        )
    return tuple(have[n] for n in names)


def parse_head(text: str, table: Mapping[str, Mapping[str, Param]], task: str = "") -> HeadSpec:
    """Parse ``NAME[:key=value,...]`` against ``table`` (head name -> its parameters) into typed values.

    Every parameter of the head is in the spec (defaults filled in); a chosen option's own parameters only when given
    with another value than their default, so that specs written before a choice brought any still read the same.

    Raises:
        ValueError: unknown head or key, a malformed pair, a repeated key or a bad value; the message names the fix.
    """
    name, _, rest = text.strip().partition(":")
    if name not in table:
        for_task = f" for {task}" if task else ""
        raise InputError(f"unknown head {name!r}{for_task}; choose one of: {', '.join(sorted(table))}")
    own = table[name]
    given = _pairs(name, rest)
    params = {k: p.parse(name, k, given[k]) if k in given else p.default for k, p in own.items()}
    extra = {k: q for key, p in own.items() if p.options for k, q in p.options[params[key]].items() if k not in own}
    unknown = [k for k in given if k not in own and k not in extra]
    if unknown:
        raise InputError(f"head {name}: unknown key {unknown[0]!r} (known: {', '.join(sorted({*own, *extra}))})")
    for key, q in extra.items():
        value = q.parse(name, key, given[key]) if key in given else q.default
        if value != q.default:
            params[key] = value
    return HeadSpec(name, tuple(sorted(params.items())))


def _pairs(name: str, rest: str) -> dict[str, str]:
    """The ``key=value`` texts of a spec, each key once."""
    given: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise InputError(f"head {name}: {pair!r} is not key=value (e.g. {name}:roi=cascade)")
        if key in given:
            raise InputError(f"head {name}: key {key!r} given twice")
        given[key] = value
    return given


@dataclass(frozen=True)
class HeadDef:
    """One head family of a task: its parameters, how it is built, and how it trains unless flags say otherwise.

    ``build(task, levels)`` makes the head for a task object (which knows its classes, frames, ...) over the stored
    levels it reads; ``check(spec)`` refuses parameter combinations one key alone cannot (InputError).
    """

    params: Mapping[str, Param]
    build: Callable[[Any, tuple[LevelSpec, ...]], Any]
    train_defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[HeadSpec], None] | None = None
