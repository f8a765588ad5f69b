"""The core promise: a head trained from an fp32 store equals the same head trained on features computed online.

Same frozen backbone, same samples, same order, same views, same seed: only where the features come
from differs. If this test fails, the cache changes what users train and fcache is wrong.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract
from fcache.extract.online import OnlineFeatures
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.loop import train
from fcache.train_heads.runfolder import RunDir
from fcache.train_heads.training import prepare_training, training_data
from media import coco_dataset


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    images, ann = coco_dataset(root / "coco", n=4)
    out = root / "train.zarr"
    cfg = ExtractConfig.from_flags(dataset="coco", root=str(images), annotations=str(ann), out=str(out), model="swinv2-t", random_init=True,
                        input_size=128, dtype="fp32", views=2, view_scale=(0.6, 1.4), shard_size=2, num_workers=0, seed=3)  # fmt: skip
    assert run_extract(cfg).exit_code == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["fpn:rois=32,rpn_batch=64", "bifpn:layers=2,rois=32,rpn_batch=64,roi=cascade"])
def test_head_from_fp32_store_equals_head_trained_online(store, tmp_path, head):
    cfg = TrainConfig(store=str(store), out=str(tmp_path / "cached"), head=head, iters=3, batch_size=2, lr=1e-3, warmup=1,
                      num_workers=0, device="cpu", seed=5, checkpoint_every=100)  # fmt: skip
    cached = prepare_training(cfg)
    train(cfg, cached.task, cached.model, training_data(cached, cfg.seed), RunDir(cfg.out), progress=False)

    cfg_online = dataclasses.replace(cfg, out=str(tmp_path / "online"))
    online = prepare_training(cfg_online)
    base = training_data(online, cfg.seed, levels=())  # same samples, views, geometry, targets; no stored features
    data = OnlineFeatures.from_dataset(base, tuple(lv.name for lv in online.levels))
    assert data[0]["view"] == training_data(cached, cfg.seed)[0]["view"]
    train(cfg_online, online.task, online.model, data, RunDir(cfg_online.out), progress=False)

    a, b = cached.model.state_dict(), online.model.state_dict()
    assert a.keys() == b.keys()
    moved = 0
    initial = prepare_training(dataclasses.replace(cfg, out=str(tmp_path / "init"))).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        moved += int(not torch.equal(a[k], initial[k]))
    assert moved > len(a) // 2  # training really changed the head
