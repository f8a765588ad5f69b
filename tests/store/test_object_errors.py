"""Object-storage failures a user meets (a missing bucket, an endpoint that cannot be reached, a size that is not one)
are one line naming the store, exit code 2, never a client library's traceback."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fcache.cli import main
from fcache.common.errors import InputError, StoreError
from fcache.store.backends import parse_size
from fcache.store.backends.objects import ObjectBackend
from helpers import build_store
from s3 import free_port


def test_a_missing_bucket_is_one_line(tmp_path, s3_server):
    src = build_store(tmp_path / "s.zarr", n=4, shard_size=2)
    r = CliRunner().invoke(main, ["copy", str(src), "s3://fcache-no-such-bucket/x.zarr"])
    assert r.exit_code == 2, r.output
    assert "the bucket 'fcache-no-such-bucket' does not exist" in r.output and "Traceback" not in r.output


def test_an_endpoint_that_cannot_be_reached_is_one_line(s3_server):
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": {"retries": {"max_attempts": 1}}}
    r = CliRunner().invoke(main, ["info", "s3://bucket/x.zarr", "--storage-options", json.dumps(options)])
    assert r.exit_code == 2, r.output
    assert "s3://bucket/x.zarr: cannot reach the object store (EndpointConnectionError" in r.output


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_network_errors_of_either_client_become_store_errors(scheme):
    """The classes the clients raise when nothing answers (botocore's, aiohttp's, the resolver's) are recognised."""
    import socket

    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey
    from botocore.exceptions import EndpointConnectionError

    key = ConnectionKey("storage.googleapis.com", 443, True, True, None, None, None)
    raised = [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1/x"),
        aiohttp.ClientConnectorError(key, OSError(111, "Connect call failed")),
        socket.gaierror(-2, "Name or service not known"),
    ]
    backend = ObjectBackend(f"{scheme}://bucket/x.zarr")
    for e in raised:

        async def fail(e=e):
            raise e

        with pytest.raises(StoreError, match=f"{scheme}://bucket/x.zarr: cannot reach the object store"):
            backend._sync(fail())

    async def other():
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # anything else keeps its traceback
        backend._sync(other())


@pytest.mark.parametrize("text", ["nanGB", "1e400GB", "infTB", "-1GB", "12XB", "1e30TB"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(InputError, match="is not a size"):
        parse_size(text)
    assert parse_size("1.5TB") == 1_500_000_000_000 and parse_size("512MiB") == 512 * 2**20
