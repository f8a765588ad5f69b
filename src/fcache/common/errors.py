"""The errors fcache raises for what users got wrong; anything else that escapes a command is a bug.

``fcache``'s commands turn a :class:`FcacheError` into one line on stderr and exit code 2 (no traceback), and let
every other exception show its traceback. Raise an ``FcacheError`` subclass only with a message that names what is
wrong and what to do. ``InputError`` is also a ``ValueError``, so Python callers can catch bad values the usual way.
"""

from __future__ import annotations


class FcacheError(Exception):
    """A mistake of the user's (flags, files, data, a store or RUN folder that does not fit); the message says what to do.

    Raised in a DataLoader worker process, it reaches the main process re-made by torch from a message that holds the
    worker's whole traceback (``Caught X in DataLoader worker process 0. Original Traceback ...``): the error keeps
    its own line only, so the user sees the same line as with ``--num-workers 0``.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_own_line(args[0], type(self)),)
        super().__init__(*args)


def _own_line(message: str, cls: type) -> str:
    """``message`` itself, or the original message inside a worker's re-raised traceback text."""
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind("\n" + marker)
    return message[at + 1 + len(marker) :].strip() if at >= 0 else message


class InputError(FcacheError, ValueError):
    """A flag, a file or a combination of them that cannot be used as given."""


class MetadataError(InputError):
    """The dataset's metadata is invalid; ``problems`` lists every problem found, not just the first."""

    def __init__(self, source: str, problems: list[str], limit: int = 20, *, hint: str = "") -> None:
        shown = "; ".join(problems[:limit]) + (f"; ... and {len(problems) - limit} more" if len(problems) > limit else "")
        super().__init__(f"{source}: {len(problems)} problem(s) in the metadata: {shown}" + (f" -- {hint}" if hint else ""))
        self.problems = problems


class StoreError(FcacheError):
    """A store cannot be used as asked; the message says what to do."""


class CorruptStoreError(StoreError):
    """Bytes on disk do not match what was committed."""


class LeaseHeld(StoreError):
    """Another live driver holds the store's lease; the message names it and what to do."""


class Fp16OverflowError(InputError):
    """Features exceed float16's range; the run must switch dtype."""


class DivergedError(FcacheError):
    """The training loss stopped being finite."""


ON_ERROR = ("skip", "fail")  # --on-error: record a bad sample (or input) and go on, or stop at the first


class SampleFailed(FcacheError):
    """``--on-error fail``: the first failed sample stops the run (exit code 1, committed units kept)."""


class Interrupted(Exception):  # noqa: N818 -- what happened, as the user sees it
    """Ctrl-C stopped a long command; the message says what was kept and the command that continues (exit code 130)."""
