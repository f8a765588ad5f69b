"""Head specs on the command line: ``NAME[:key=value,...]`` parsed against a table of typed parameters.

Shared by every task's HEADS table; a spec prints back canonically (all parameters, sorted) for config.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fcache.common.errors import InputError
from fcache.spec import LEVEL_NAMES, LevelSpec


@dataclass(frozen=True)
class Param:
    """One head parameter: its default and what values it accepts.

    ``kind`` is ``int``, ``choice`` (one of ``choices``), ``levels`` (``all`` or names joined by ``+``,
    e.g. ``p3+p4+p5``; a comma would end the value) or ``prob`` (a float in [0, 1): dropout, stochastic depth).
    """

    default: Any
    kind: str = "int"
    choices: tuple[str, ...] = ()
    minimum: int = 1
    maximum: int = 1024  # a bound that keeps a typo from allocating hundreds of GB
    help: str = ""

    def parse(self, head: str, key: str, text: str) -> Any:
        if self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise InputError(f"head {head}: {key}={text!r} is not an integer (e.g. {key}={self.default})") from None
            if value < self.minimum:
                raise InputError(f"head {head}: {key}={value} must be at least {self.minimum}")
            if value > self.maximum:
                raise InputError(f"head {head}: {key}={value} must be at most {self.maximum}")
            return value
        if self.kind == "choice":
            if text not in self.choices:
                raise InputError(f"head {head}: {key}={text!r} is not one of {', '.join(self.choices)}")
            return text
        if self.kind == "levels":
            return _parse_levels(head, key, text)
        if self.kind == "prob":
            try:
                prob = float(text)
            except ValueError:
                raise InputError(f"head {head}: {key}={text!r} is not a number (e.g. {key}={self.default})") from None
            if not 0 <= prob < 1:
                raise InputError(f"head {head}: {key}={prob} must be in [0, 1)")
            return prob
        raise AssertionError(f"unknown parameter kind {self.kind!r}")


def _parse_levels(head: str, key: str, text: str) -> str:
    if text == "all":
        return text
    names = text.split("+")
    known = set(LEVEL_NAMES.values())
    bad = [n for n in names if n not in known]
    if bad or len(set(names)) != len(names):
        raise InputError(f"head {head}: {key}={text!r} must be 'all' or distinct level names joined by '+', e.g. p3+p4+p5")
    return "+".join(sorted(names))


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head: its name and every parameter (defaults filled in)."""

    name: str
    params: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.params) if self.params else "")


def select_levels(head: HeadSpec, available: Sequence[LevelSpec], minimum: int = 2) -> tuple[LevelSpec, ...]:
    """The stored levels a head reads: its ``levels`` parameter (``all`` = every stored level, fine to coarse).

    Raises:
        ValueError: a wanted level is not stored, or fewer than ``minimum`` levels remain.
    """
    wanted = head["levels"]
    have = {lv.name: lv for lv in available}
    names = sorted(have, key=lambda n: have[n].stride) if wanted == "all" else wanted.split("+")
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
    """Parse ``NAME[:key=value,...]`` against ``table`` (head name -> its parameters).

    Raises:
        ValueError: unknown head or key, a malformed pair, a repeated key or a bad value; the message names the fix.
    """
    name, _, rest = text.strip().partition(":")
    if name not in table:
        for_task = f" for {task}" if task else ""
        raise InputError(f"unknown head {name!r}{for_task}; choose one of: {', '.join(sorted(table))}")
    known = table[name]
    given: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise InputError(f"head {name}: {pair!r} is not key=value (e.g. {name}:roi=cascade)")
        if key not in known:
            raise InputError(f"head {name}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        if key in given:
            raise InputError(f"head {name}: key {key!r} given twice")
        given[key] = known[key].parse(name, key, value)
    params = {k: given.get(k, p.default) for k, p in known.items()}
    return HeadSpec(name, tuple(sorted(params.items())))


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
