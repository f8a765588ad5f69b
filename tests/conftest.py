"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

TINY = {"model": "swinv2-t", "input_size": 128, "seed": 3}  # the tiny frozen backbone of the suite: random-init SwinV2-T


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random-init SwinV2-T at 128 px (seed 3) on the CPU, built once per session for the tests that only run it."""
    from fcache.extract.backbones import build_backbone

    return build_backbone(TINY["model"], input_size=TINY["input_size"], random_init=True, seed=TINY["seed"], device="cpu")
