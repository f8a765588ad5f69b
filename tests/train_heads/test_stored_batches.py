"""Training reads stored values and decodes them on its device (``Batch.to``): for every stored form a training step
sees the float32 Dataset's features and takes the same losses and gradients, bit for bit; DataLoader workers hand their
batches over in shared memory without a copy."""

from __future__ import annotations

import copy

import pytest
import torch
from dethelpers import build_detection_store

from fcache import store as fstore
from fcache.common.rng import rng_scope
from fcache.store.dtypes import DTYPES
from fcache.store.transit import Buffers
from fcache.train_heads import TrainConfig
from fcache.train_heads.data import train_loader
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.loop import make_optimizer, train_step
from fcache.train_heads.training import prepare_training, training_data

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = "fpn:channels=8,rois=16,rpn_batch=16"
CPU = torch.device("cpu")


def _prepared(path, form):
    store = build_detection_store(path, dtype=form, codec="zstd")
    cfg = with_defaults(TrainConfig(store=str(store), out="", head=HEAD, iters=2, batch_size=2, num_workers=0, device="cpu"))
    p = prepare_training(cfg)
    stored = training_data(p, cfg.seed)
    as_float = copy.copy(stored)  # the same samples and views, read as the Dataset's float32 tensors
    as_float.stored = False
    assert stored.stored
    return cfg, p, stored, as_float


def _steps(cfg, p, data, buffers, steps=1, workers=0):
    """Training steps from ``data``: each batch's float32 features (cloned), losses and gradients."""
    model = copy.deepcopy(p.model)
    opt = make_optimizer(model, cfg)
    out = []
    loader = train_loader(data, p.task, batch_size=2, seed=cfg.seed, start=0, stop=steps, num_workers=workers)
    with rng_scope(seed=0):
        for it, batch in enumerate(loader):
            batch = batch.to(CPU, buffers)
            feats = {lv: x.clone() for lv, x in batch.features.items()}
            losses = train_step(model, opt, p.task, batch, cfg, CPU, it)
            grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
            out.append((feats, losses, grads))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (fa, la, ga), (fb, lb, gb) in zip(a, b, strict=True):
        assert list(fa) == list(fb) and all(x.dtype == torch.float32 and torch.equal(x, fb[lv]) for lv, x in fa.items())
        assert la == lb and all(v == v for v in la.values())  # equal and not NaN
        assert ga.keys() == gb.keys() and len(ga) > 0 and all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("form", tuple(DTYPES))
def test_steps_from_stored_values_equal_the_float32_path(form, tmp_path):
    cfg, p, stored, as_float = _prepared(tmp_path / "train.zarr", form)
    _same(_steps(cfg, p, as_float, None), _steps(cfg, p, stored, Buffers()))


def test_workers_hand_stored_batches_over_in_shared_memory(tmp_path):
    cfg, p, stored, as_float = _prepared(tmp_path / "train.zarr", "int4")
    loader = train_loader(stored, p.task, batch_size=2, seed=cfg.seed, start=0, stop=2, num_workers=2)
    batches = list(loader)
    assert all(s.values.is_shared() and s.side is not None and s.side.is_shared() for b in batches for s in b.stored.values())
    assert all(s.values.dtype == torch.uint8 for b in batches for s in b.stored.values())  # int4: two values per byte
    buffers = Buffers()
    first = {lv: x.data_ptr() for lv, x in batches[0].to(CPU, buffers).features.items()}
    assert {lv: x.data_ptr() for lv, x in batches[1].to(CPU, buffers).features.items()} == first  # decoded into the same memory
    _same(_steps(cfg, p, as_float, None, steps=2), _steps(cfg, p, stored, Buffers(), steps=2, workers=2))


@pytest.mark.parametrize(("form", "read_path"), [("bf16", "direct"), ("int3", "zarr"), ("pca8", "zarr")])
def test_items_of_every_view_decode_to_the_float32_items_on_either_read_path(form, read_path, tmp_path):
    store = fstore.open(build_detection_store(tmp_path / "s.zarr", dtype=form, codec="zstd"), read_path=read_path)
    picked = [(1, None), (0, None)]  # every view of each sample (eval's AllViews)
    batch = store.read_stored(store.level_names, picked)
    want = store.read_many([(lv, i, None) for i, _ in picked for lv in store.level_names])
    for j, lv in enumerate(store.level_names):
        got = batch[lv].decode()
        assert got.shape == (2, store.num_views, *want[j].shape[1:]) and store.num_views == 2
        for k in range(len(picked)):
            assert torch.equal(got[k], torch.from_numpy(want[k * len(store.level_names) + j]))
            assert torch.equal(batch[lv].row(k).decode(), got[k])  # an item's own row decodes alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["fp16", "bf16", "int8", "int4", "pca4"])
def test_a_gpu_decodes_pinned_batches_to_the_cpus_values(form, tmp_path):
    cfg, p, stored, as_float = _prepared(tmp_path / "train.zarr", form)
    cuda = torch.device("cuda")
    pinned = train_loader(stored, p.task, batch_size=2, seed=cfg.seed, start=0, stop=2, num_workers=1, device=cuda)
    floats = train_loader(as_float, p.task, batch_size=2, seed=cfg.seed, start=0, stop=2, num_workers=0)
    for a, b in zip(pinned, floats, strict=True):
        assert all(s.values.is_pinned() for s in a.stored.values())
        got = a.to(cuda).features
        assert all(torch.equal(got[lv].cpu(), x) for lv, x in b.features.items())
