"""A process's batches of stored values are read into arrays handed out again (``fcache.store.transit.Recycled``): an
array is reused only once nothing holds it, and no batch ever shows another batch's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcache import store as fstore
from fcache.store.transit import Recycled, Stored, recycled
from helpers import build_store


def test_an_array_is_handed_out_again_only_once_nothing_holds_it():
    pool = Recycled()
    a = pool.empty((4, 5), torch.int16)
    ptr = a.data_ptr()
    holders = [a[1], a[2:].numpy(), Stored(a, None, None), a.untyped_storage()]  # type: ignore[arg-type]
    del a
    kept = []  # held, so that only the first array can be free
    while holders:
        kept.append(pool.empty((4, 5), torch.int16))
        assert kept[-1].data_ptr() != ptr  # something still holds the first array
        holders.pop()
    assert len({x.data_ptr() for x in kept}) == len(kept)
    for _ in range(2):  # nothing holds it; the second time, the first time's tensor is gone too
        c = pool.empty((4, 5), torch.int16)
        assert c.data_ptr() == ptr
        del c
    others = [pool.empty((5, 4), torch.int16), pool.empty((4, 5), torch.uint8)]  # another shape, another dtype
    assert all(x.data_ptr() != ptr for x in others)


def test_a_pool_keeps_its_most_recent_arrays_only():
    pool = Recycled()
    held = [pool.empty((k + 1,), torch.int8) for k in range(Recycled.KEPT + 4)]
    assert len(pool._arrays) == Recycled.KEPT
    del held
    assert pool.empty((1,), torch.int8) is not None and len(pool._arrays) == Recycled.KEPT


def _decoded(store, picked, levels):
    """The float32 values of ``picked`` read as stored values (into recycled arrays) and decoded, with the arrays' addresses."""
    batch = store.read_stored(levels, picked)
    return {lv: batch[lv].decode().clone() for lv in levels}, {lv: batch[lv].values.data_ptr() for lv in levels}


def _want(store, picked, levels):
    got = store.read_many([(lv, i, v) for i, v in picked for lv in levels])
    return {lv: np.stack([got[k * len(levels) + j] for k in range(len(picked))]) for j, lv in enumerate(levels)}


@pytest.mark.parametrize("form", ["fp16", "int8", "pca8"])
def test_recycled_batches_hold_their_own_values_only(form, tmp_path):
    store = fstore.open(build_store(tmp_path / "s.zarr", n=10, dtype=form, views=2))
    levels = store.level_names
    reads = [
        ([(0, 0), (5, 1), (9, 0), (2, 1)], levels),
        ([(7, 1), (3, 0)], levels),  # fewer samples after more
        ([(1, 1), (8, 0), (4, 0), (6, 1)], levels),  # the first batch's shape again, other samples and views
        ([(1, 0), (8, 1), (4, 1), (6, 0)], levels[1:3]),  # other levels
        ([(2, None), (9, None)], levels),  # every view
    ]
    seen: dict[str, set[int]] = {lv: set() for lv in levels}
    reused = 0
    for picked, lvs in reads:
        got, ptrs = _decoded(store, picked, lvs)
        want = _want(store, picked, lvs)
        for lv in lvs:
            assert torch.equal(got[lv], torch.from_numpy(want[lv])), (picked, lv)
            reused += ptrs[lv] in seen[lv]
            seen[lv].add(ptrs[lv])
    assert reused >= len(levels)  # the third batch was read into the first one's arrays


def test_a_batch_held_keeps_its_values_while_others_are_read(tmp_path):
    store = fstore.open(build_store(tmp_path / "s.zarr", n=8, dtype="int8"))
    levels = store.level_names
    held = store.read_stored(levels, [(0, 0), (1, 0), (2, 0)])
    rows = [held[lv].row(1) for lv in levels]  # an item of the batch, as collation sees it
    first = {lv: held[lv].decode().clone() for lv in levels}
    del held
    for picked in ([(5, 0), (6, 0), (7, 0)], [(3, 0), (4, 0), (5, 0)]):
        again = store.read_stored(levels, picked)
        assert all(again[lv].values.data_ptr() != rows[j].values.data_ptr() for j, lv in enumerate(levels))
    for j, lv in enumerate(levels):
        assert torch.equal(rows[j].decode(), first[lv][1])


def test_a_process_reuses_its_batch_arrays(tmp_path):
    store = fstore.open(build_store(tmp_path / "s.zarr", n=8, dtype="fp16"))
    ptr = store.read_stored(["p2"], [(0, 0), (1, 0)])["p2"].values.data_ptr()
    assert store.read_stored(["p2"], [(2, 0), (3, 0)])["p2"].values.data_ptr() == ptr
    assert any(a.ctypes.data == ptr for a in recycled()._arrays)
