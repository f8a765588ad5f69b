"""Does a store's manifest describe its arrays? Shapes, dtypes, chunking, N, views and levels, checked against zarr.

The manifest decides how every byte is read (which levels, how many views, which dtype, how big each map is).
A manifest edited after the fact (a level's channels, ``preprocessing.views``, ``input_size``, ``dataset.n``,
``storage.shard_size``, ``storage.dtype`` or ``storage.forms``) or an array removed would make readers decode the wrong geometry or
crash. Every reader refuses such a store with the first problem (``FeatureStore``), and ``fcache verify`` lists all
of them. Only array metadata is read (a few small JSON files), never a chunk.
"""

from __future__ import annotations

from pathlib import Path

from fcache.common.errors import InputError
from fcache.spec import GEOMETRY_FIELDS, LEVEL_NAMES, Manifest
from fcache.store import layout
from fcache.store.backends import Backend, open_backend
from fcache.store.dtypes import stored


def manifest_problems(root: str | Path | Backend, m: Manifest) -> list[tuple[str, str]]:
    """(what, problem) pairs: the manifest against itself and against the arrays it describes; empty when they agree."""
    backend = open_backend(root)
    out: list[tuple[str, str]] = []
    try:
        forms = {lv.name: stored(m.storage.form(lv.name)) for lv in m.levels}
        stored(m.storage.dtype)
    except InputError as e:
        return [("storage.forms" if m.storage.forms else "storage.dtype", str(e))]
    unknown = sorted(set(m.storage.forms) - {lv.name for lv in m.levels})
    if unknown:
        out.append(("storage.forms", f"names level {unknown[0]}, which the store does not hold"))
    s, n, v = m.storage.shard_size, m.dataset.n, m.num_views
    for name, value, minimum in (
        ("storage.shard_size", s, 1),
        ("dataset.n", n, 0),
        ("views", v, 1),
        ("backbone.input_size", m.backbone.input_size, 1),
    ):
        if value < minimum:
            out.append((name, f"is {value}, must be at least {minimum}"))
    if not m.levels:
        out.append(("backbone.levels", "lists no level"))
    for lv in m.levels:
        if LEVEL_NAMES.get(lv.stride) != lv.name or lv.channels < 1:
            out.append((f"backbone.levels.{lv.name}", f"stride {lv.stride} / {lv.channels} channels do not make level {lv.name}"))
    if out:
        return out
    wanted: dict[str, tuple[tuple[int, ...], object, tuple[int, ...] | None]] = {}
    for lv in m.levels:
        d, shape = forms[lv.name], m.level_shape(lv.name)
        wanted[f"{layout.FEATURES}/{lv.name}"] = ((n, v, *d.stored_shape(shape)), d.numpy, (s, v, *d.stored_shape(shape)))
        if d.side is not None:
            wanted[f"{layout.SCALES}/{lv.name}"] = ((n, v, *d.side_shape(shape)), d.side, None)
        basis = d.basis_shape(lv.channels)
        if basis is not None:
            wanted[f"{layout.BASIS}/{lv.name}"] = (basis, "float32", None)
    wanted[layout.STATUS] = ((n,), "uint8", None)
    wanted[layout.GEOMETRY] = ((n, v, len(GEOMETRY_FIELDS)), "float32", None)
    wanted[layout.KEYS] = ((n,), None, None)
    store = backend.zarr_store()
    for name, (shape, want_dtype, shards) in wanted.items():
        out += [(name, p) for p in _array_problems(store, name, shape, want_dtype, shards)]
    return out


def _array_problems(store: object, name: str, shape: tuple[int, ...], dtype: object, shards: tuple[int, ...] | None) -> list[str]:
    import numpy as np
    import zarr

    try:
        arr = zarr.open_array(store, path=name, mode="r", zarr_format=3)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        return [f"the array is missing or unreadable ({type(e).__name__})"]
    problems = []
    if tuple(arr.shape) != shape:
        problems.append(f"has shape {tuple(arr.shape)}, the manifest says {shape}")
    if dtype is not None and arr.dtype != np.dtype(dtype):  # type: ignore[call-overload]
        problems.append(f"holds {arr.dtype}, the manifest says {np.dtype(dtype)}")  # type: ignore[call-overload]
    if shards is not None and (arr.shards is None or tuple(arr.shards) != shards or tuple(arr.chunks) != (1, 1, *shards[2:])):
        problems.append(f"is chunked {arr.chunks} in shards {arr.shards}, the manifest says one sample-view per chunk, {shards} per shard")
    return problems


def check_consistent(root: str | Path | Backend, m: Manifest) -> None:
    """Raise StoreError with the first disagreement between the manifest and the arrays (readers call this)."""
    from fcache.common.errors import StoreError

    backend = open_backend(root)
    problems = manifest_problems(backend, m)
    if problems:
        what, problem = problems[0]
        raise StoreError(f"{backend.url}: {what}: {problem}; the store was edited or damaged (run `fcache verify {backend.url}`)")
