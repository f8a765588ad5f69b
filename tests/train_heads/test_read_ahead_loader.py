"""The training loader over a store in object storage reads ahead (``EpochItems`` + ``FeatureStore.expect``): its
batches equal the local store's read batch by batch, with and without workers, across epochs and random views; a
process takes the batches it is handed from the read-ahead, and one it did not expect starts it again from there;
evaluation's in-order batches (one view, or all views of each sample) likewise."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fcache import store as fstore
from fcache.store.fetch import ShardFetcher
from fcache.train_heads.data import AllViews, Collate, EpochItems, InOrder, TrainBatches, train_loader
from helpers import build_store

KW = dict(n=10, shard_size=4, views=2, dtype="int8")  # scaled: side data travels with the values
TASK = SimpleNamespace(targets=lambda item, geometry: None)  # Collate's only use of a task here


@pytest.fixture(scope="module")
def stores(s3_server, tmp_path_factory) -> tuple[str, str]:
    local = build_store(tmp_path_factory.mktemp("ahead") / "s.zarr", **KW)
    return str(build_store(s3_server.bucket() + "/s.zarr", **KW)), str(local)


def items(path: str):
    s = fstore.open(path)
    return s.dataset(["p2", "p5"], view="random", views=(0, 1), seed=4, stored=True)


def batches(path: str, workers: int, read_ahead: int) -> list:
    loader = train_loader(items(path), TASK, batch_size=4, seed=1, start=1, stop=7, num_workers=workers, read_ahead=read_ahead)
    return list(loader)  # 6 batches of 4 over 10 samples: three epochs, each with its views


def same(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.index == y.index and x.view == y.view and list(x.stored) == list(y.stored) == ["p2", "p5"]
        for lv in x.stored:
            assert torch.equal(x.stored[lv].values, y.stored[lv].values) and torch.equal(x.stored[lv].side, y.stored[lv].side)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_read_ahead_equal_the_local_stores(stores, workers):
    remote, local = stores
    want = batches(local, 0, 0)
    assert len({v for b in want for v in b.view}) == 2  # both views drawn
    same(batches(remote, workers, 3), want)
    assert not any(t.name == "fcache-readahead" for t in threading.enumerate())


def counted_reads(monkeypatch) -> list[int]:
    """Requests a remote store's fetcher reads batch by batch (not read ahead)."""
    reads: list[int] = []
    original = ShardFetcher.read

    def read(self, requests, **kw):
        if self.backend.remote:
            reads.append(len(requests))
        return original(self, requests, **kw)

    monkeypatch.setattr(ShardFetcher, "read", read)
    return reads


@pytest.mark.parametrize("views", ["one", "all", "chosen"])
def test_evaluation_batches_read_ahead_in_order_equal_the_local_stores(stores, views, monkeypatch):
    """Evaluation and predict (every item), cka (chosen items: ``indices``)."""
    remote, local = stores

    def loaded(path: str, workers: int) -> list:
        s = fstore.open(path)
        data = AllViews(s, ["p2", "p5"], ()) if views == "all" else s.dataset(["p2", "p5"], view=1, stored=True)
        items = InOrder(data, 3, read_ahead=4, indices=[8, 0, 6, 3, 5, 9, 1] if views == "chosen" else None)
        got = list(torch.utils.data.DataLoader(items, batch_size=3, collate_fn=Collate(TASK, with_targets=False), num_workers=workers))
        items.close()
        return got

    want = loaded(local, 0)
    assert len(want) == (3 if views == "chosen" else 4)  # 7 or 10 items in batches of 3: the last is short
    same(loaded(remote, 2), want)
    reads = counted_reads(monkeypatch)
    same(loaded(remote, 0), want)
    assert reads == [] and not any(t.name == "fcache-readahead" for t in threading.enumerate())


def test_a_process_takes_its_batches_from_the_read_ahead(stores, monkeypatch):
    remote, local = stores
    plan = TrainBatches(10, 4, seed=1, start=0, stop=9)
    ahead, plain = EpochItems(items(remote), plan, read_ahead=3), EpochItems(items(local))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(num_workers=2))  # worker 0 of 2
    reads = counted_reads(monkeypatch)
    for it in (0, 2, 4, 5, 7, 8):  # 5 and 8: not this worker's next batch (4 + 2, 7 + 2): read ahead again from there
        keys = plan.batch(it)
        got, want = ahead.__getitems__(keys), plain.__getitems__(keys)
        assert reads == [], it  # nothing read batch by batch
        for g, w in zip(got, want, strict=True):
            assert (g["index"], g["view"]) == (w["index"], w["view"])
            for lv in ("p2", "p5"):
                np.testing.assert_array_equal(g["features"][lv].values.numpy(), w["features"][lv].values.numpy())
    ahead.close()
    assert not ahead.data.store.expecting and not any(t.name == "fcache-readahead" for t in threading.enumerate())


def test_workers_forked_from_a_process_reading_ahead_read_ahead_of_their_own(stores):
    remote, local = stores
    data = fstore.open(remote).dataset(["p2", "p5"], view=1, stored=True)
    data.store.expect([("p2", 9, 1)], window=2)  # the main process reads ahead when its workers are forked
    assert data.store.expecting
    items = InOrder(data, 3, read_ahead=4)
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=Collate(TASK, with_targets=False), num_workers=2, timeout=120)
    want = torch.utils.data.DataLoader(
        InOrder(fstore.open(local).dataset(["p2", "p5"], view=1, stored=True), 3),
        batch_size=3,
        collate_fn=Collate(TASK, with_targets=False),
    )
    same(list(loader), list(want))  # no worker waits on the parent's read-ahead
    data.store.expect(None)
    assert not any(t.name == "fcache-readahead" for t in threading.enumerate())


def test_the_read_ahead_flag_reaches_the_training_and_evaluation_loaders(tmp_path, monkeypatch) -> None:
    import json

    from test_cls_probe import QUICK, colour_images, extract, train

    from fcache.train_heads import evaluation, loop
    from fcache.train_heads.config import TrainConfig

    seen: list[tuple[str, int]] = []
    real_loader, real_in_order = loop.train_loader, evaluation.InOrder

    def loader(*a, **kw):
        seen.append(("train", kw["read_ahead"]))
        return real_loader(*a, **kw)

    def in_order(data, batch_size, read_ahead, **kw):
        seen.append(("eval", read_ahead))
        return real_in_order(data, batch_size, read_ahead, **kw)

    monkeypatch.setattr(loop, "train_loader", loader)
    monkeypatch.setattr(evaluation, "InOrder", in_order)
    store = extract(colour_images(tmp_path / "images", 2, seed=0), tmp_path / "s.zarr")
    r = train(store, tmp_path / "run", "--val-store", str(store), "--iters", "2", "--batch-size", "2", "--read-ahead", "5", *QUICK)
    assert r.exit_code == 0, r.output
    assert seen and set(seen) == {("train", 5), ("eval", 5)}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["read_ahead"] == 5
    cfg = TrainConfig(store="s", out="o", head="linear", iters=1)
    assert "read_ahead" not in cfg.identity()  # operational: a run resumes with another window
