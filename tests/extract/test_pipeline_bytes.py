"""The in-process pipeline (decoding, forwards, encoding on the device, writer threads) stores exactly the bytes that
a plain ``StoreWriter.write_unit`` of the same float features does, and records their error as float64 sums give it."""

from __future__ import annotations

import numpy as np
import pytest

from fcache import store as fstore
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract
from fcache.extract.rebuild import rebuild
from fcache.extract.stages import SampleDataset
from fcache.store import layout
from fcache.store.backends import open_backend
from media import image_folder

STORED = (layout.FEATURES, layout.SCALES, layout.STATUS, layout.GEOMETRY)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("folder"), n=3)


def plain_store(path, s: fstore.FeatureStore) -> tuple[fstore.StoreWriter, dict[int, dict[str, np.ndarray]]]:
    """A store of ``s``'s manifest written unit by unit from one forward per view image; the float features per unit."""
    m, keys = s.manifest, [str(k) for k in s.keys]
    r = rebuild(m, keys)
    writer = fstore.create(path, m, keys)
    items = SampleDataset(r.source, r.refs, list(range(len(keys))), m)
    floats = {}
    for u in writer.units:
        unit = [items[i] for i in range(u.start, u.stop)]
        views = [[r.backbone.forward(img[None]) for img in it.pixels] for it in unit]
        feats = {lv: np.stack([np.concatenate([f[lv].numpy() for f in v]) for v in views]) for lv in s.level_names}
        status = np.array([it.status for it in unit], np.uint8)
        writer.write_unit(u, feats, status, np.stack([it.geometry for it in unit]))
        floats[u.index] = feats
    return writer, floats


@pytest.mark.parametrize("dtype", ["fp16", pytest.param("int4", marks=pytest.mark.slow)])
def test_pipeline_stores_the_bytes_of_a_plain_write(tmp_path, folder, dtype):
    out = tmp_path / "s.zarr"
    flags = dict(model="swinv2-t", random_init=True, input_size=128, shard_size=2, batch_size=1, num_workers=0, views=2)
    run_extract(ExtractConfig.from_flags(dataset="folder", root=str(folder), out=str(out), dtype=dtype, **flags))
    s = fstore.open(out)
    plain, floats = plain_store(tmp_path / "plain.zarr", s)
    ours, theirs = open_backend(out), plain.backend
    keys = sorted(k for k in theirs.listing() if k.startswith(STORED) and not k.endswith(layout.ROOT_META))
    assert keys == sorted(k for k in ours.listing() if k.startswith(STORED) and not k.endswith(layout.ROOT_META))
    assert any(k.startswith(layout.SCALES) for k in keys) == (dtype == "int4")
    for k, a, b in zip(keys, ours.get_many(keys), theirs.get_many(keys), strict=True):
        assert a == b, k
    got, want = fstore.StoreWriter(out).committed(), plain.committed()
    assert sorted(got) == sorted(want) == [0, 1]
    for u, rec in got.items():
        assert {k: f for k, f in rec.files.items() if k.startswith(STORED)} == {
            k: f for k, f in want[u].files.items() if k.startswith(STORED)
        }
        assert rec.status == want[u].status and rec.status_counts == want[u].status_counts
        start = plain.units[u].start
        for lv, (err, ref) in rec.quant.items():
            x = floats[u][lv].astype(np.float64)
            kept = np.stack([s.read(lv, i) for i in range(start, start + len(x))]).astype(np.float64)
            assert err == pytest.approx(np.square(kept - x).sum(), rel=1e-6) and err > 0
            assert ref == pytest.approx(np.square(x).sum(), rel=1e-6)
