"""One conformance suite, run for every dtype x codec, for image- and video-shaped levels, on local disk and on S3.

The S3 rows run against a moto server on 127.0.0.1 (``tests/s3.py``), two GCS rows against fake-gcs-server: the same
store through the object-storage backend.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fcache import store as fstore
from fcache.cli import main
from fcache.spec import Status
from fcache.store.backends import open_backend
from fcache.store.dtypes import DTYPES as STORED
from fcache.store.dtypes import bf16_bits_to_float32, decode
from fcache.store.info import describe
from helpers import decoded, fitted_bases, make_manifest, sample_features, write_all


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Reference rounding written independently in numpy: nearest, ties to even, raw 16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)


class StoreConformance:
    """Behaviour every store must have, whatever its dtype and codec (subclassed below)."""

    dtype = "fp16"
    codec = "zstd"
    frames: int | None = None
    views = 2
    failed = (3,)
    location = "local"  # or "s3"
    input_size = 64

    @pytest.fixture(scope="class")
    @classmethod
    def built(cls, tmp_path_factory, request):
        if cls.location in ("s3", "gcs"):
            path = request.getfixturevalue(f"{cls.location}_server").bucket() + "/s.zarr"
        else:
            path = tmp_path_factory.mktemp("store") / "s.zarr"
        m, keys = make_manifest(
            n=10, dtype=cls.dtype, codec=cls.codec, shard_size=4, views=cls.views, frames=cls.frames, input_size=cls.input_size
        )
        write_all(fstore.create(path, m, keys, bases=fitted_bases(m)), failed=cls.failed)
        return path, m

    def expected(self, m, i):
        """What decoding must give back for sample i (inputs rounded to the stored dtype, or as they are for a lossy one)."""
        rounding = ROWS[self.dtype].rounding or (lambda v: v)
        return {k: rounding(v) for k, v in sample_features(m, i).items()}

    def test_round_trip(self, built):
        path, m = built
        s = fstore.open(path)
        for i in s.ok_indices:
            want = self.expected(m, int(i))
            for lv in s.level_names:
                got = s.read(lv, int(i))
                assert got.dtype == np.float32 and got.shape == want[lv].shape
                if ROWS[self.dtype].rounding is None:  # lossy: within the row's relative RMSE
                    rel = np.sqrt(np.square(got - want[lv]).sum() / np.square(want[lv]).sum())
                    assert rel < ROWS[self.dtype].rel_rmse, (lv, rel)
                else:
                    np.testing.assert_array_equal(got, want[lv])

    def test_direct_reads_equal_zarrs(self, built):
        """The direct read path (``fcache.store.fetch``: kept shard indexes, byte ranges) gives zarr's values bit for bit, read
        a batch at a time (``read_many``) or read ahead (``read_stream``)."""
        path, m = built
        direct = fstore.open(path)
        assert all(direct.fetcher is not None and direct.fetcher.supports(lv) for lv in direct.level_names)
        plain = pickle.loads(pickle.dumps(fstore.open(path, read_path="zarr")))  # as a DataLoader worker gets it
        assert plain.fetcher is None
        requests = [(lv, int(i), v) for i in direct.ok_indices for lv in direct.level_names for v in (None, self.views - 1)]
        streamed = list(direct.read_stream(iter(requests), window=3))  # read ahead: 3 requests in flight, refilled
        for (lv, i, v), got, ahead in zip(requests, direct.read_many(requests), streamed, strict=True):
            want = plain.read(lv, i, v)
            assert got.dtype == want.dtype == ahead.dtype == np.float32 and got.flags.writeable and ahead.flags.writeable
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(ahead, want)

    def test_stored_bits(self, built):
        path, m = built
        s = fstore.open(path)
        raw = np.asarray(s.array(f"features/{s.level_names[0]}")[0])
        x = sample_features(m, 0)[s.level_names[0]]
        if self.dtype == "bf16":  # raw 16 bits equal torch's own bfloat16 rounding
            ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert raw.dtype == np.uint16
            np.testing.assert_array_equal(raw, ref)
            assert s.array(f"features/{s.level_names[0]}").attrs["fcache_dtype"] == "bf16"
        elif self.dtype == "int8":
            assert raw.dtype == np.int8 and np.abs(raw).max() == 127
            scales = np.asarray(s.array(f"scales/{s.level_names[0]}")[0])
            assert scales.shape == raw.shape[:-2]
        elif STORED[self.dtype].per_byte > 1:  # packed along W: the stored width is W over the values per byte, rounded up
            per_byte = STORED[self.dtype].per_byte
            assert raw.shape == (*x.shape[:-1], -(-x.shape[-1] // per_byte))
            assert s.array(f"features/{s.level_names[0]}").attrs["shape"] == list(x.shape[1:])
        assert raw.dtype == ROWS[self.dtype].raw

    def test_statuses_and_failed_samples(self, built):
        path, _ = built
        s = fstore.open(path)
        assert s.status[3] == Status.DECODE_ERROR
        assert list(s.ok_indices) == [i for i in range(10) if i != 3]
        assert s.status_counts() == {"ok": 9, "decode_error": 1}
        with pytest.raises(fstore.StoreError, match="decode_error"):
            s.read("p2", 3)
        errors = [json.loads(line) for line in s.backend.get("errors.jsonl").decode().splitlines()]
        assert [e["key"] for e in errors] == ["img_0003.jpg"]

    def test_dataset_items(self, built):
        path, m = built
        s = fstore.open(path)
        ds = s.dataset(["p3", "p5"], view=1)
        assert len(ds) == 9
        item = ds[3]  # the 4th ok sample is sample 4
        assert item["index"] == 4 and item["view"] == 1
        assert set(item["features"]) == {"p3", "p5"}
        for lv, t in item["features"].items():
            assert t.dtype == torch.float32
            assert tuple(t.shape) == m.level_shape(lv)
            np.testing.assert_allclose(t.numpy(), s.read(lv, 4, 1))
        assert item["geometry"][0].item() == 104  # orig_h of sample 4

    def test_random_views_are_seeded(self, built):
        path, _ = built
        ds = fstore.open(path).dataset(["p5"], view="random", views=(0, 1), seed=7)
        first = [ds[j]["view"] for j in range(len(ds))]
        assert first == [ds[j]["view"] for j in range(len(ds))]
        epochs = []
        for e in range(4):
            ds.set_epoch(e)
            epochs.append(tuple(ds[j]["view"] for j in range(len(ds))))
        assert len(set(epochs)) > 1 and {v for ep in epochs for v in ep} == {0, 1}

    def test_dataloader_workers(self, built):
        path, _ = built
        ds = fstore.open(path).dataset(["p4"])
        ref = torch.stack([ds[j]["features"]["p4"] for j in range(len(ds))])
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: b)
        got = torch.stack([it["features"]["p4"] for batch in loader for it in batch])
        assert torch.equal(ref, got)

    def test_to_dask(self, built):
        path, _ = built
        s = fstore.open(path)
        arr = s.to_dask("p3")
        assert arr.dtype == np.float32 and arr.shape == (10, s.num_views, *s.manifest.level_shape("p3"))
        np.testing.assert_allclose(np.asarray(arr[5].compute()), s.read("p3", 5))

    def test_to_dask_is_one_chunk_per_shard(self, built):
        path, _ = built
        s = fstore.open(path)
        for lv in s.level_names:
            arr = s.to_dask(lv)
            assert arr.chunks[0] == (4, 4, 2) and arr.numblocks[1:] == (1,) * (arr.ndim - 1)  # shards of 4 samples
            values = np.asarray(arr.compute())
            for i in s.ok_indices:
                np.testing.assert_array_equal(values[i], s.read(lv, int(i)))

    def test_xarray_opens_the_store(self, built):
        xr = pytest.importorskip("xarray")
        path, _ = built
        s = fstore.open(path)
        features = xr.open_zarr(path, group="features", consolidated=False, mask_and_scale=False)
        scales = xr.open_zarr(path, group="scales", consolidated=False) if STORED[self.dtype].scaled else None
        for lv in s.level_names:
            time = ("time",) if self.frames else ()
            x = f"x_{lv}_packed" if STORED[self.dtype].per_byte > 1 else f"x_{lv}"
            c = f"component_{lv}" if STORED[self.dtype].fitted else f"channel_{lv}"
            assert features[lv].dims == ("sample", "view", *time, c, f"y_{lv}", x)
            raw = features[lv].values
            np.testing.assert_array_equal(raw, np.asarray(s.array(f"features/{lv}")[:]))
            if self.dtype in ("fp16", "fp32", "int8"):  # plain numbers (x per-channel scales)
                values = raw.astype(np.float32) * (scales[lv].values[..., None, None] if scales is not None else 1)
            else:  # raw bits, packed values: decoded by the form's table row
                side = None if scales is None else scales[lv].values
                values = decode(raw, self.dtype, side, s.manifest.level_shape(lv)[-1], s.bases.get(lv))
            for i in s.ok_indices:
                np.testing.assert_array_equal(values[i], s.read(lv, int(i)))
        samples = xr.open_zarr(path, group="samples", consolidated=False)
        assert samples["geometry"].dims == ("sample", "view", "geometry_field")
        np.testing.assert_array_equal(samples["status"].values, s.status)
        assert [str(k) for k in samples["key"].values] == list(s.keys)

    def test_info(self, built):
        path, m = built
        r = CliRunner().invoke(main, ["info", str(path), "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert d["units_committed"] == d["units_total"] == 3
        assert d["status_counts"] == {"ok": 9, "decode_error": 1}
        p2 = d["levels"][0]
        assert p2["name"] == "p2" and p2["shape"] == [10, self.views, *m.level_shape("p2")]
        assert p2["disk_bytes"] > 0 and p2["compression_ratio"] > 0
        err = p2["quantisation_error"]
        assert (err == 0) if self.dtype == "fp32" else (0 < err < max(0.01, ROWS[self.dtype].rel_rmse))
        assert p2["form"] == self.dtype and p2["bits_per_value"] == pytest.approx(8 * p2["disk_bytes"] / math.prod(p2["shape"]))
        text = CliRunner().invoke(main, ["info", str(path)]).output
        assert "p5" in text and "3/3 committed" in text

    def test_info_sizes_equal_a_listings_sum(self, built, monkeypatch):
        """info reads sizes from the ledger and by key, never listing: a listing's sums are what it must find."""
        path, m = built
        backend = open_backend(path)
        with monkeypatch.context() as patched:
            patched.setattr(type(backend), "listing", lambda *a, **k: pytest.fail("info listed the store"))
            d = describe(path)
        listing = backend.listing()
        for lv in d["levels"]:
            arrays = ("features", "scales", "basis")
            assert lv["disk_bytes"] == sum(size for k, size in listing.items() if k.startswith(tuple(f"{a}/{lv['name']}/" for a in arrays)))
        writer = fstore.StoreWriter(path)
        owned = {k for u in writer.units for k in writer.unit_keys(u)}
        assert d["units_bytes"] == sum(size for k, size in listing.items() if k in owned) > 0

    def test_verify_clean(self, built):
        path, _ = built
        for flags in ([], ["--fast"]):
            r = CliRunner().invoke(main, ["verify", str(path), *flags])
            assert r.exit_code == 0, r.output
            assert r.output.startswith("OK")

    def test_reopen_same_config_resumes_nothing(self, built):
        path, m = built
        before = decoded(path)
        w = fstore.create(path, m, [f"img_{i:04d}.jpg" for i in range(10)])
        assert w.pending() == []
        after = decoded(path)
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])


@dataclass(frozen=True)
class Row:
    """What a stored dtype must do: the numpy dtype of its raw values, and how decoding rounds the input (exactly, or
    ``rounding=None``: within ``rel_rmse``)."""

    raw: type
    rounding: Callable[[np.ndarray], np.ndarray] | None
    rel_rmse: float = 0.0


ROWS = {
    "fp32": Row(np.float32, lambda v: v),
    "fp16": Row(np.float16, lambda v: v.astype(np.float16).astype(np.float32)),
    "bf16": Row(np.uint16, lambda v: bf16_bits_to_float32(float32_to_bf16_bits(v))),  # raw 16 bits
    "int8": Row(np.int8, None, rel_rmse=0.01),  # symmetric per-channel scales
    "bf16m3": Row(np.uint16, None, rel_rmse=0.0625),  # every value within 2**-4 of itself
    "int6": Row(np.int8, None, rel_rmse=0.05),
    "int4": Row(np.uint8, None, rel_rmse=0.2),  # two values per byte
    "int3": Row(np.uint8, None, rel_rmse=0.35),  # two values per byte
    "int2": Row(np.uint8, None, rel_rmse=0.6),  # four values per byte
    **{f"pca{r}": Row(np.int8, None, rel_rmse=0.05) for r in (4, 8, 16, 32)},  # features of one direction: int6's rounding
}
DTYPES = tuple(STORED)


def test_every_stored_dtype_has_conformance_rows():
    assert set(ROWS) == set(DTYPES), "a new dtype in fcache.store.dtypes.DTYPES needs its row here"


CODECS = ("zstd", "zstd:7", "lz4", "none")
S3_ROWS = {("fp16", "zstd"), ("int8", "zstd"), ("bf16", "none"), ("int4", "zstd")}  # ~20 s each on moto: the default, scaled, raw, packed
# The codec compresses a chunk's bytes whatever wrote them: every codec runs with the first release's dtypes and with
# int4 (packed bytes); the other compact forms with the default codec; the projected forms share all their code but
# the rank, so pca8 runs for images and clips and the other ranks for images.
EVERY_CODEC = ("fp32", "fp16", "bf16", "int8", "int4")


def _cases(dtype: str) -> list[tuple[str, int | None]]:
    codecs = CODECS if dtype in EVERY_CODEC else ("zstd",)
    frames: tuple[int | None, ...] = (None,) if dtype.startswith("pca") and dtype != "pca8" else (None, 3)
    return [(c, f) for c in codecs for f in frames]


for _location, _prefix in (("local", "TestStore"), ("s3", "TestS3Store")):
    for _dtype in DTYPES:
        for _codec, _frames in _cases(_dtype):
            _name = f"{_prefix}_{_dtype}_{_codec.replace(':', '')}_{'video' if _frames else 'image'}"
            _attrs = {"dtype": _dtype, "codec": _codec, "frames": _frames, "location": _location}
            if STORED[_dtype].per_byte > 1:
                _attrs["input_size"] = 72  # maps 18, 9, 5 and 3 wide: packed rows end in a padded byte
            if _location == "s3" and (_dtype, _codec) not in S3_ROWS:
                continue  # the decoding is the local rows' (the same direct read path); S3 rows cover the backend
            globals()[_name] = type(_name, (StoreConformance,), _attrs)
for _dtype, _frames in (("fp16", None), ("int8", 3)):  # GCS (fake-gcs-server): the same store through gcsfs
    _name = f"TestGcsStore_{_dtype}_zstd_{'video' if _frames else 'image'}"
    globals()[_name] = type(_name, (StoreConformance,), {"dtype": _dtype, "codec": "zstd", "frames": _frames, "location": "gcs"})
