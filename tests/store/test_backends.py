"""Every backend passes the conformance suite fcache ships (``fcache.store.testing.BackendTests``): local disk, S3 (a
moto server) read through s3fs and through obstore, and GCS (fake-gcs-server), each checked through raw helpers that
bypass the backend under test."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fcache.store.backends import Backend, open_backend
from fcache.store.backends.objects import ObjectBackend
from fcache.store.testing import BackendTests


def bucket_and_key(backend: Backend, key: str) -> tuple[str, str]:
    """The bucket and object name of ``key`` in a store at ``scheme://bucket/prefix``, from its URL alone."""
    url = urllib.parse.urlparse(backend.url)
    return url.netloc, f"{url.path.strip('/')}/{key}"


class TestLocalBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        return open_backend(tmp_path / "b.zarr")

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        path = Path(backend.url) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        path = Path(backend.url) / key
        return path.read_bytes() if path.is_file() else None


class TestS3Backend(BackendTests):
    reader = "fsspec"  # s3fs reads ranges and sizes

    @pytest.fixture
    def backend(self, s3_bucket):
        backend = ObjectBackend(s3_bucket + "/b.zarr", reader=self.reader)
        assert backend.read_client == ("s3fs" if self.reader == "fsspec" else self.reader)
        return backend

    @pytest.fixture(autouse=True)
    def client(self, s3_server):
        self.s3 = s3_server.client()  # boto3, not s3fs: another client than the backend's

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        bucket, name = bucket_and_key(backend, key)
        self.s3.put_object(Bucket=bucket, Key=name, Body=data)

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        bucket, name = bucket_and_key(backend, key)
        try:
            return self.s3.get_object(Bucket=bucket, Key=name)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None


class TestS3ObstoreBackend(TestS3Backend):
    reader = "obstore"  # obstore reads ranges and sizes; the commit protocol stays on s3fs

    @pytest.fixture(autouse=True)
    def needs_obstore(self):
        pytest.importorskip("obstore", reason="obstore reads need obstore (the cloud extra)")


class TestGcsBackend(BackendTests):
    # fake-gcs-server ignores ifGenerationMatch on media uploads and deletes; on real GCS compare-and-swap rests on the
    # same generation preconditions (docs/cloud.md, "The protocol on objects")
    compare_and_swap = False

    @pytest.fixture
    def backend(self, gcs_server):
        return open_backend(gcs_server.bucket() + "/b.zarr")

    def raw_put(self, backend: Backend, key: str, data: bytes) -> None:
        bucket, name = bucket_and_key(backend, key)
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        urllib.request.urlopen(urllib.request.Request(f"{self.host}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST"))

    def raw_get(self, backend: Backend, key: str) -> bytes | None:
        bucket, name = bucket_and_key(backend, key)
        try:
            with urllib.request.urlopen(f"{self.host}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    @property
    def host(self) -> str:
        return os.environ["STORAGE_EMULATOR_HOST"]  # set by the gcs_server fixture (plain HTTP on 127.0.0.1)
