"""rng_scope: a block draws from the generators it is given (or seeded), and the process's four generators (torch,
numpy, Python; CUDA where there is one) are exactly as before it, also when the block raises."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fcache.common.rng import rng_scope, rng_state, seeded_state, set_rng_state


def draws() -> tuple[list[float], list[float], list[float]]:
    """One draw of each generator (this moves them on)."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_the_block_draws_from_the_state_given_and_leaves_the_process_as_it_was():
    seed_all(1)
    given = rng_state()
    want_inside = draws()
    seed_all(2)
    before = rng_state()
    want_after = draws()
    set_rng_state(before)
    with rng_scope(given):
        assert draws() == want_inside
    assert draws() == want_after


def test_a_seeded_block_draws_as_after_manual_seed_and_restores_on_error():
    torch.manual_seed(7)
    want = torch.randn(4)
    torch.manual_seed(3)
    before = rng_state()
    want_after = draws()
    set_rng_state(before)
    with pytest.raises(RuntimeError), rng_scope(seed=7, cuda=False):
        assert torch.equal(torch.randn(4), want)
        raise RuntimeError("the block fails")
    assert draws() == want_after


def test_a_fresh_heads_state_is_torch_seeded_and_takes_nothing_from_the_process():
    torch.manual_seed(5)
    want = torch.rand(2)
    torch.manual_seed(9)
    before = torch.get_rng_state()
    state = seeded_state(5)
    assert torch.equal(torch.get_rng_state(), before)
    with rng_scope(state):
        assert torch.equal(torch.rand(2), want)
