"""The writer's own feature shards are the bytes zarr's sharding codec writes, for every layout it takes on."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from fcache import store as fstore
from fcache.store import layout, shards, writer
from helpers import build_store

CASES = [  # form, codec, views (clips for video), frames; 10 samples in shards of 4: the last shard holds 2 rows
    ("fp16", "zstd", 1, None),
    ("int4", "lz4", 3, None),  # packed values, three views in morton order
    ("int8", "none", 2, None),
    ("bf16m3", "zstd:5", 2, 2),  # video: (n, clips, frames, C, H, W)
    ("pca8", "zstd", 1, None),
]


@pytest.mark.parametrize(("dtype", "codec", "views", "frames"), CASES)
def test_feature_shards_equal_zarrs(tmp_path, monkeypatch, dtype, codec, views, frames):
    kw = dict(n=10, dtype=dtype, codec=codec, shard_size=4, views=views, frames=frames, failed=(5, 8, 9))  # the last shard holds none
    ours = build_store(tmp_path / "ours.zarr", **kw)
    monkeypatch.setattr(writer, "sharded_as_features", lambda *a: False)
    theirs = build_store(tmp_path / "theirs.zarr", **kw)
    s = fstore.open(ours)
    group = zarr.open_group(str(ours), mode="r", zarr_format=3)
    for lv in s.level_names:
        arr = group[f"{layout.FEATURES}/{lv}"]
        assert shards.sharded_as_features(arr, codec, s.manifest.storage.form(lv))
        keys = [layout.shard_key(arr.path, k, arr.ndim) for k in range(3)]
        assert (tmp_path / "ours.zarr" / keys[1]).exists()
        assert (tmp_path / "ours.zarr" / keys[2]).exists() == (dtype in ("int4", "pca8"))  # failed samples' zeros encoded
        for key in keys:
            mine, zarrs = (tmp_path / p / key for p in ("ours.zarr", "theirs.zarr"))
            assert mine.exists() == zarrs.exists() and (not mine.exists() or mine.read_bytes() == zarrs.read_bytes()), key
    np.testing.assert_array_equal(s.read(s.level_names[0], 7), fstore.open(theirs).read(s.level_names[0], 7))


def test_an_array_laid_out_otherwise_is_left_to_zarr(tmp_path):
    from fcache.store.codecs import chunk_codecs

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    two_per_chunk = g.create_array("a", shape=(8, 1, 4, 2, 2), chunks=(2, 1, 4, 2, 2), shards=(4, 1, 4, 2, 2), dtype="float16",
                                   compressors=chunk_codecs("zstd", "fp16"))  # fmt: skip
    assert not shards.sharded_as_features(two_per_chunk, "zstd", "fp16")
    other_codec = g.create_array("b", shape=(8, 1, 4, 2, 2), chunks=(1, 1, 4, 2, 2), shards=(4, 1, 4, 2, 2), dtype="float16",
                                 compressors=chunk_codecs("lz4", "fp16"))  # fmt: skip
    assert not shards.sharded_as_features(other_codec, "zstd", "fp16")
    assert shards.sharded_as_features(other_codec, "lz4", "fp16")
