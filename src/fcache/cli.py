"""The ``fcache`` command: parses flags, builds a config, calls one function. No logic lives here."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fcache import __version__

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """Bad input from the user: one line, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn: F) -> F:
    """Turn the errors fcache raises for users into one clear line and exit code 2."""
    from fcache.store import StoreError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (StoreError, ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(f"disk full ({e.filename or 'no space left on device'}): free some space and rerun") from None
            raise

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fcache")
def main() -> None:
    """fcache: run a frozen vision backbone once, cache its multi-scale features, train many heads from the cache.

    A store is a zarr v3 folder; see `fcache info STORE` for what it holds and `fcache verify STORE`
    to check every committed byte.
    """


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@user_errors
def info(store: str, as_json: bool) -> None:
    """Show what STORE holds: manifest, levels and shapes, bytes on disk, compression, statuses, int8 error."""
    from fcache.store.summary import describe, format_info

    d = describe(store)
    click.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--fast", is_flag=True, help="Check presence, sizes and statuses only; skip checksums and decoding.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def verify(store: str, fast: bool, as_json: bool) -> None:
    """Check STORE against its ledger: temporaries, missing or changed shards, CRCs, statuses, NaN/Inf.

    Names each bad file with its sample range. Exit code 0 when the store is sound, 1 otherwise.
    """
    from tqdm import tqdm

    from fcache.store import open as open_store
    from fcache.store import verify as run_verify

    total = len(open_store(store).ledger)
    with tqdm(total=total, unit="unit", desc="verify", disable=as_json or None, file=sys.stderr) as bar:
        report = run_verify(store, fast=fast, progress=bar.update)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            click.echo(p.line())
        mode = "fast" if fast else "full"
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{verdict}: {report.units_committed}/{report.units_total} units committed, {report.files_checked} files checked ({mode})"
        )
    sys.exit(0 if report.ok else 1)
