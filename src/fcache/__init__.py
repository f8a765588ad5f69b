"""fcache: cache a frozen giant backbone's multi-scale features once, train many task heads from the cache."""

from __future__ import annotations

__version__ = "0.1.0"
