"""How a command reaches its stores: the settings every store-taking command shares, written once as fields.

``StoreAccess`` (``--storage-options``) is mixed into every config that names a store; ``ReadAccess`` adds the local
disk cache of remote shards (``--cache-dir``, ``--cache-size``) to the configs that train or evaluate from stores.
Imports nothing heavy (``fcache.cli`` builds its flags from these fields at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcache.common.flags import flag
from fcache.store.backends import parse_size, parse_storage_options

STORAGE_OPTIONS_HELP = (
    'JSON object passed as it is to s3fs / gcsfs for s3:// and gs:// stores, e.g. \'{"profile": "lab"}\'; '
    '\'{"s3": {...}, "gs": {...}}\' gives each scheme its own (obstore, which reads s3:// chunks, maps the common keys: '
    "docs/cloud.md). Credentials are best left to the environment or a profile."
)


@dataclass(frozen=True, kw_only=True)
class StoreAccess:
    """Options for stores in object storage (``s3://``, ``gs://``); local paths need none."""

    storage_options: str = flag("", STORAGE_OPTIONS_HELP, show_default=False)

    def options(self) -> dict[str, Any]:
        """The parsed ``--storage-options`` (InputError naming the flag when it is not a JSON object)."""
        return parse_storage_options(self.storage_options)


@dataclass(frozen=True, kw_only=True)
class ReadAccess(StoreAccess):
    """``StoreAccess`` plus a local disk cache of a remote store's shards, least recently used evicted first."""

    cache_dir: str = flag("", "Local folder caching the shards read from stores in object storage.", show_default=False)
    cache_size: str = flag("", "Most bytes --cache-dir may hold, e.g. 200GB [default: 50GB].", show_default=False)

    def open_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``fcache.store.open``."""
        return {"storage_options": self.options(), "cache_dir": self.cache_dir or None, "cache_size": self.cache_size or None}

    def check_access(self) -> None:
        self.options()
        if self.cache_size:
            parse_size(self.cache_size)
