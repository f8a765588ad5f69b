"""fcache: cache a frozen giant backbone's multi-scale features once, train many task heads from the cache.

``fcache.load(RUN)`` returns the run's frozen backbone + trained head as one ``nn.Module`` (``fcache.apps.model``);
it is imported when first used, so ``import fcache`` stays light (no torch).
"""

from __future__ import annotations

from typing import Any

from fcache._version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from fcache.apps.model import load

        return load
    raise AttributeError(f"module 'fcache' has no attribute {name!r}")
