"""The process's random generators (torch's CPU and CUDA ones, numpy's legacy one, Python's ``random``) as one state,
and ``rng_scope``: a block that draws from generators of its own and leaves the process's as they were.

A head's RNG state (init, dropout, RPN / RoI sampling) is swapped in around each of its steps this way and kept in its
checkpoints; a backbone's random init is seeded inside a scope, so building one never reseeds the caller's generators.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch

RngState = dict[str, Any]  # torch, cuda, numpy, python: tensors and plain values (loads with ``weights_only``)


def rng_state(cuda: bool = True) -> RngState:
    """The generators' state now, as checkpoints keep it (CUDA's when ``cuda`` and a GPU is there, else ``[]``)."""
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Set every generator to ``state`` (``rng_state``'s form; CUDA's only when it holds some and a GPU is there)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextmanager
def rng_scope(state: Mapping[str, Any] | None = None, *, seed: int | None = None, cuda: bool = True) -> Iterator[None]:
    """Run the block on generators of its own; afterwards the process's are exactly as before it.

    Args:
        state: the generators the block starts from (``rng_state``'s form); None: the process's current ones.
        seed: seed torch's generators (as ``torch.manual_seed``) at the start of the block.
        cuda: False for a block that draws on the CPU only: CUDA's generators are neither seeded nor saved, so a
            process that has not touched its GPU does not start CUDA here.
    """
    outer = rng_state(cuda)
    try:
        if state is not None:
            set_rng_state(state)
        if seed is not None and cuda:
            torch.manual_seed(seed)
        elif seed is not None:
            torch.default_generator.manual_seed(seed)
        yield
    finally:
        set_rng_state(outer)


def seeded_state(seed: int) -> RngState:
    """The state a fresh head starts from: torch's generators seeded with ``seed``, numpy's and Python's as they are."""
    with rng_scope(seed=seed):
        return rng_state()
