"""The version of fcache: recorded in every store's manifest and RUN's config.json (provenance, never fingerprinted)."""

__version__ = "0.1.0"
