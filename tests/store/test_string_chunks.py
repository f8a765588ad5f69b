"""Driver-written string targets skip zarr's per-chunk path: the objects they leave are byte for byte the ones zarr writes
(whole blocks, the padded edge chunk), a write that is not whole chunks goes through zarr, and readers see the values;
on local disk and on S3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from fcache import store as fstore
from fcache.store import layout
from fcache.store.backends import open_backend
from fcache.store.codecs import string_chunks, string_codecs
from fcache.store.writer import TargetSpec
from helpers import make_manifest

N, SHARD = 11, 4  # three chunks, the last one of 3 samples


def _values() -> np.ndarray:
    return np.array([json.dumps([{"bbox": [i, 0.5, 2.25, 1e-05], "name": "é" * (i % 3)}] * (i % 4)) for i in range(N)], dtype=object)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_string_targets_are_zarrs_bytes(where, tmp_path, request, monkeypatch):
    path = request.getfixturevalue("s3_bucket") + "/s.zarr" if where == "s3" else tmp_path / "s.zarr"
    m, keys = make_manifest(n=N, shard_size=SHARD)
    writer = fstore.create(path, m, keys, targets={"annotations": TargetSpec("str", (), fill="[]")})
    values = _values()
    with monkeypatch.context() as patched:
        patched.setattr(zarr.Array, "__setitem__", lambda *a: pytest.fail("whole chunks of strings went through zarr"))
        writer.write_targets("annotations", values[:8], 0)  # whole chunks
        writer.write_targets("annotations", values[8:], 8)  # the edge chunk
    backend = open_backend(path)
    reference = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    ref = reference.create_array("a", shape=(N,), chunks=(SHARD,), dtype=str, **string_codecs())
    ref[:] = values
    ours = [backend.get(layout.shard_key("targets/annotations", k, 1)) for k in range(3)]
    assert ours == [(tmp_path / "ref.zarr" / "a" / "c" / str(k)).read_bytes() for k in range(3)] == string_chunks(values, SHARD)
    writer.write_targets("annotations", np.array(["[]", "[1]"], dtype=object), 5)  # not whole chunks: through zarr
    values[5:7] = ["[]", "[1]"]
    got = zarr.open_array(backend.zarr_store(), path="targets/annotations", mode="r", zarr_format=3)[:]
    assert list(got) == list(values)
    assert list(fstore.open(path).keys) == keys  # samples/key in chunks of KEYS_CHUNK: read whole
