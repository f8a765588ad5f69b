"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

TINY = {"model": "swinv2-t", "input_size": 128, "seed": 3}  # the tiny frozen backbone of the suite: random-init SwinV2-T


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random-init SwinV2-T at 128 px (seed 3) on the CPU, built once per session for the tests that only run it."""
    from fcache.extract.backbones import build_backbone

    return build_backbone(TINY["model"], input_size=TINY["input_size"], random_init=True, seed=TINY["seed"], device="cpu")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session, with the AWS_* environment pointing at it."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (the cloud extra)")
    from s3 import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket: ``s3://fcache-<random>``."""
    return s3_server.bucket()
