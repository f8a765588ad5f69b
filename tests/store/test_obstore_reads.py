"""Range reads and sizes of s3:// stores through obstore (``store/backends/obstore_reads.py``): the same bytes and
values as through s3fs, connected from the same settings, s3fs when obstore is missing, cannot honour the options or
would run in a fork of a process that already used it, and failures as one line naming the store."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest

from fcache import store as fstore
from fcache.common.errors import InputError, StoreError
from fcache.store.backends import Range
from fcache.store.backends import obstore_reads as reads
from fcache.store.backends.objects import ObjectBackend, _sync
from helpers import build_store
from s3 import free_port

pytest.importorskip("obstore", reason="obstore reads need obstore (the cloud extra)")


@pytest.fixture(scope="module")
def remote_store(s3_server) -> str:
    """A small store in S3 (two shards, two views, int8, a failed sample), shared by the tests that only read it."""
    return str(build_store(s3_server.bucket() + "/s.zarr", n=4, shard_size=2, views=2, dtype="int8", failed=(1,)))


def both(url: str, options: dict | None = None) -> tuple[ObjectBackend, ObjectBackend]:
    s3fs, obs = ObjectBackend(url, options, reader="fsspec"), ObjectBackend(url, options, reader="obstore")
    assert (s3fs.read_client, obs.read_client) == ("s3fs", "obstore")
    return s3fs, obs


def test_both_clients_read_the_same_bytes_and_values(remote_store):
    url = remote_store
    s3fs, obs = both(url)
    assert ObjectBackend(url).read_client == "obstore"  # the default where obstore is installed
    key = "features/p2/c/0/0/0/0/0"
    size = s3fs.size(key)
    assert size and obs.sizes([key, "features/p2", "nope"]) == [size, None, None]  # a prefix is no object
    rng = np.random.default_rng(0)
    starts = rng.integers(0, size - 1, 12)
    ranges = [Range(key, int(a), int(a + rng.integers(1, 300))) for a in starts]  # some overlap
    ranges += [Range(key, -20, None), Range(key, size - 5, None), Range(key, size - 4, size + 100)]
    want = s3fs.get_ranges(ranges)
    assert obs.get_ranges(ranges) == want and want[-1] == want[-2][-4:] and len(want[-3]) == 20
    assert obs.get_ranges([Range(key, 3, 3)]) == [b""]  # no request (s3fs would send an invalid range and get it all)
    requests = [(lv, i, v) for i in (0, 2, 3) for lv in ("p2", "p5") for v in (0, 1, None)]
    got = [fstore.FeatureStore(b).read_many(requests) for b in (s3fs, obs)]
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_obstore_or_with_options_it_cannot_honour_s3fs_reads(remote_store, monkeypatch):
    url = remote_store
    assert ObjectBackend(url, {"requester_pays": True}).read_client == "s3fs"
    assert (
        reads.unsupported("s3", {"config_kwargs": {"proxies": {}}}) == "--storage-options config_kwargs proxies have no obstore equivalent"
    )
    assert reads.unsupported("gs", {}) == "gs:// reads through gcsfs"
    assert reads.unsupported("s3", {"endpoint_url": "http://x", "key": "k", "secret": "s", "config_kwargs": {"retries": {}}}) is None
    want = fstore.FeatureStore(url).read_many([("p2", 2, 0)])[0]
    monkeypatch.setitem(sys.modules, "obstore", None)  # import obstore now raises ImportError
    backend = ObjectBackend(url)
    assert backend.read_client == "s3fs"
    np.testing.assert_array_equal(fstore.FeatureStore(backend).read_many([("p2", 2, 0)])[0], want)
    with pytest.raises(InputError, match=f"^{url}: cannot read through obstore: obstore is not installed$"):
        ObjectBackend(url, reader="obstore")


def test_the_docs_say_what_each_option_becomes():
    text = (Path(__file__).parents[2] / "docs" / "cloud.md").read_text()
    section = text[text.index("### Which client reads") :]
    assert all(f"`{key}`" in section for key in (*reads.S3_OPTIONS, *reads.CLIENT_KWARGS, *reads.CONFIG_KWARGS))


def test_settings_come_from_the_options_as_s3fs_takes_them(s3_server, s3_bucket, monkeypatch):
    """Endpoint, region and keys from --storage-options alone (nothing in the environment), retries from botocore's."""
    ObjectBackend(s3_bucket + "/x", reader="fsspec").put("a", b"0123456789")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    options = {
        "endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing",
        "client_kwargs": {"region_name": "eu-west-1"}, "config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 3},
    }  # fmt: skip
    b = ObjectBackend(s3_bucket + "/x", options, reader="obstore")
    assert b.get_ranges([Range("a", 2, 5), Range("a", -3, None)]) == [b"234", b"789"]
    store = _sync(b.reads.store(b.fs))
    assert store.config["endpoint"] == s3_server.endpoint and store.config["region"] == "eu-west-1"
    assert store.config["access_key_id"] == "testing" and store.retry_config["max_retries"] == 2
    assert store.client_options["connect_timeout"] == "3s" and store.client_options["allow_http"] in (True, "true")
    anon = ObjectBackend(s3_bucket + "/x", {"endpoint_url": s3_server.endpoint, "anon": True}, reader="obstore")
    assert _sync(anon.reads.store(anon.fs)).config["skip_signature"] in (True, "true")


def test_refreshable_credentials_are_asked_again(s3_bucket, monkeypatch):
    """Credentials that expire (SSO, instance roles, assumed roles) reach obstore through a provider it calls."""
    asked = []

    class Refreshable:  # botocore's RefreshableCredentials, as the session gives them
        def refresh_needed(self) -> bool:
            return False

        async def get_frozen_credentials(self):
            asked.append(1)
            return type("Frozen", (), {"access_key": "testing", "secret_key": "testing", "token": None})

    async def session_credentials(fs, options):
        return None, reads._Refreshed(Refreshable())

    monkeypatch.setattr(reads, "_credentials", session_credentials)
    b = ObjectBackend(s3_bucket + "/x", reader="obstore")
    b.put("a", b"0123456789")
    assert b.get_ranges([Range("a", 0, 4)]) == [b"0123"] and asked


def _read_in_child(backend: ObjectBackend, out) -> None:
    out.put((backend.read_client, backend.get_ranges([Range("a", 0, 4)])))


def test_a_fork_of_a_process_that_read_through_obstore_reads_through_s3fs(s3_bucket):
    """obstore's runtime hangs in a forked child once the parent used it (DataLoader workers are forked): s3fs reads."""
    b = ObjectBackend(s3_bucket + "/x")
    b.put("a", b"0123456789")
    assert b.get_ranges([Range("a", 0, 4)]) == [b"0123"] and reads._RAN_IN is not None
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(b, out))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and out.get(timeout=5) == ("s3fs", [b"0123"])
    assert b.read_client == "obstore"


def test_a_missing_bucket_and_an_unreachable_endpoint_are_one_line(s3_server):
    with pytest.raises(StoreError, match="^s3://fcache-no-such-bucket/x.zarr: the bucket 'fcache-no-such-bucket' does not exist"):
        ObjectBackend("s3://fcache-no-such-bucket/x.zarr", reader="obstore").get_ranges([Range("a", 0, 4)])
    s3_server.client().create_bucket(Bucket="my-bucket")
    for reader in ("obstore", "fsspec"):  # a missing object in a bucket named ...bucket is no missing bucket
        with pytest.raises(FileNotFoundError):
            ObjectBackend("s3://my-bucket/x", reader=reader).get_ranges([Range("nope", 0, 4)])
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StoreError) as e:
        ObjectBackend("s3://bucket/x.zarr", options, reader="obstore").get_ranges([Range("a", 0, 4)])
    line = str(e.value)
    assert line.startswith("s3://bucket/x.zarr: cannot reach the object store (GenericError: ") and "\n" not in line


@pytest.mark.parametrize("reply", [{"ResponseMetadata": {"HTTPHeaders": {"x-amz-bucket-region": "ap-south-1"}}}, None])
def test_the_region_of_a_bucket_on_aws_is_asked_once(reply):
    """botocore follows S3's redirects to a bucket's region, obstore does not: on AWS the region is asked first; a 403
    carries it too."""

    class Client:
        async def head_bucket(self, Bucket):  # noqa: N803 - botocore's argument name
            if reply is None:
                e = Exception("403")
                e.response = {"ResponseMetadata": {"HTTPHeaders": {"x-amz-bucket-region": "sa-east-1"}}}  # type: ignore[attr-defined]
                raise e
            return reply

    assert _sync(reads._bucket_region(Client(), "b")) == ("ap-south-1" if reply else "sa-east-1")
