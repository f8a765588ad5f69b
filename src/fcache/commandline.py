"""The machinery of the ``fcache`` command: click options made from config fields (:func:`options_of`), ``--config
FILE`` merged under the flags given (:func:`with_settings`), and the group that turns a user's mistake into one line.

A config field's flag (``fcache.common.flags.Flag``) becomes one click option: its name, default, help, choices (a
table read when the command needs it: :class:`TableChoice`), parser and path check. Imports neither torch nor zarr.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fcache.common.flags import Flag, flags_of

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """Bad input from the user: one line, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn: F) -> F:
    """Turn a user's mistake (an ``FcacheError``; a path that cannot be written, a full disk) into one clear line and exit
    code 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fcache.common.errors import FcacheError, Interrupted

        try:
            return fn(*args, **kwargs)
        except FcacheError as e:
            raise UserError(str(e)) from None
        except (Interrupted, KeyboardInterrupt) as e:
            click.echo(f"Interrupted: {e}" if str(e) else "Interrupted.", err=True)
            sys.exit(130)
        except OSError as e:
            from fcache.common.files import shown_path, unusable_path

            if e.errno == errno.ENOSPC:
                again = "rerun with --resume" if fn.__name__ == "train_head" else "rerun the same command"
                where = shown_path(e.filename) if e.filename else "no space left on device"
                raise UserError(f"disk full ({where}): free some space and {again}") from None
            line = unusable_path(e)
            if line is None:
                raise
            raise UserError(line) from None

    return wrapper  # type: ignore[return-value]


class TableChoice(click.Choice):
    """A choice among a table's keys, read when the command needs them (its help, its flags), not when fcache starts."""

    def __init__(self, flag: Flag) -> None:
        self.flag = flag
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.flag.values() or ()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices:
            return value
        what = param.opts[0].lstrip("-") if param is not None and param.opts else "value"
        self.fail(f"unknown {what} {value!r}; choose one of: {', '.join(self.choices)}", param, ctx)


class StoreLocation(click.ParamType):
    """A store: a local folder (that must exist when ``exists``) or a URL (``s3://``, ``gs://``), taken as written."""

    name = "store"

    def __init__(self, exists: bool = True) -> None:
        self.local = click.Path(exists=exists, file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from fcache.store.backends import is_url

        return value if is_url(str(value)) else self.local.convert(value, param, ctx)


class Fcache(click.Group):
    """The ``fcache`` group: a command's bad flag is one line naming it (and the help to read), exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if e.ctx is None or e.ctx.command is self:
                raise
            message = " ".join(line.strip() for line in e.format_message().splitlines())
            raise UserError(f"{message} (see `fcache {e.ctx.info_name} --help`)") from None


def _base_type(hint: Any) -> Any:
    """int / float / str / bool of a field's type (``X | None`` -> X)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float, str, bool) else str


def _path_type(kind: str) -> click.ParamType:
    """The click type checking a path flag of ``kind`` (``fcache.common.flags.PATHS``)."""
    return {
        "file": click.Path(exists=True, dir_okay=False),
        "new-file": click.Path(dir_okay=False),
        "folder": click.Path(file_okay=False),
        "store": StoreLocation(),
        "new-store": StoreLocation(exists=False),
    }[kind]


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _option(field: dataclasses.Field, flag: Flag, hint: Any, config: bool = False) -> Callable[[F], F]:
    """The click option of one config field (with ``config``, a required one may come from ``--config`` instead)."""
    required = _required(field) and not config
    kwargs: dict[str, Any] = {"help": flag.help, "show_default": flag.show_default, "required": required}
    decls = [flag.option(field.name), field.name]
    base = _base_type(hint)
    if flag.path:
        kwargs["type"] = _path_type(flag.path)
        if not _required(field) and field.default:
            kwargs["default"] = field.default
        elif not _required(field):  # "" (none given) is not a path to check: the option's None stands for it
            kwargs["callback"] = lambda ctx, param, value: field.default if value is None else value
    elif base is bool:
        if flag.secondary:
            decls[0] = f"{decls[0]}/{flag.secondary}"
            kwargs["default"] = field.default
        else:
            kwargs |= {"is_flag": True, "default": False}
    elif flag.parse is not None:
        parse = flag.parse

        def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
            from fcache.common.errors import InputError

            if value is None:
                return None
            try:
                return parse(value)
            except InputError as e:
                raise click.BadParameter(str(e)) from None

        kwargs |= {"type": str, "default": flag.text_default, "callback": callback}
    else:
        kwargs |= {"type": TableChoice(flag) if flag.choices is not None else base}
        if not _required(field):
            kwargs["default"] = field.default
    return click.option(*decls, **kwargs)


CONFIG_HELP = (
    "Settings from a YAML or JSON file: keys are the flags' names (lr: 0.001, eval-every: 2e); a RUN's config.json works as "
    "one. Flags given beside it override it."
)


def options_of(*classes: type, skip: tuple[str, ...] = (), config: bool = False) -> Callable[[F], F]:
    """Click options for the flag fields of config ``classes`` (their defaults and help), in declaration order; with
    ``config``, first ``--config FILE`` (see :func:`with_settings`)."""

    def decorate(fn: F) -> F:
        options = []
        if config:
            options.append(click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help=CONFIG_HELP))
        for cls in classes:
            hints = typing.get_type_hints(cls)
            options += [_option(f, fl, hints[f.name], config) for f, fl in flags_of(cls) if f.name not in skip]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def with_settings(
    kw: dict[str, Any],
    classes: tuple[type, ...],
    required: dict[str, str],
    document: Callable[[Any], Any] | None = None,
    lists: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The command's flags ``kw`` over the settings of its ``--config FILE`` (flags given on the command line win).

    ``required``: parameter name -> flag of the settings that the command line or the file must give (those of the
    ``classes`` without a default are added); ``document`` picks the settings out of another kind of file (a RUN's
    config.json); ``lists``: settings of a repeatable flag, which the file may give as a list. A bad file is InputError
    naming it and the key; a required flag neither gives, click's usage error.
    """
    from click.core import ParameterSource

    from fcache.common.flags import read_settings

    ctx = click.get_current_context()
    path = kw.pop("config_file", None)
    if path is not None:
        for name, value in read_settings(path, classes, document, lists).items():
            if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
                kw[name] = value
    required = {f.name: fl.option(f.name) for cls in classes for f, fl in flags_of(cls) if _required(f)} | required
    for name, option in required.items():
        if kw.get(name) in (None, (), ""):
            raise click.UsageError(
                f"Missing option '{option}'" + (f" (give it, or {option.lstrip('-')}: in {path})." if path else "."), ctx
            )
    return kw
