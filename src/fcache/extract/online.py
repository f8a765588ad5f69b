"""The frozen-online setting: the same items a store gives, with features computed by the backbone on the fly.

This is what fcache saves users from; it exists to prove the cache changes nothing (the fidelity test:
a head trained from an fp32 store equals one trained online) and to measure what the cache saves
(``fcache bench``). It composes ``extract`` (source, views, backbone) with a store's Dataset (which
views, geometry, targets), so it lives beside ``cli``, above both.
"""

from __future__ import annotations

from typing import Any

import torch

from fcache import store as fstore
from fcache.extract.rebuild import Rebuilt, rebuild
from fcache.extract.stages import view_images
from fcache.spec import Manifest


class OnlineFeatures(torch.utils.data.Dataset):
    """Wraps a store Dataset opened without levels: item j gets the features of its (sample, view) computed online."""

    def __init__(self, base: fstore.FeatureDataset, levels: tuple[str, ...], rebuilt: Rebuilt, manifest: Manifest) -> None:
        self.base, self.levels, self.r, self.m = base, levels, rebuilt, manifest

    @classmethod
    def from_dataset(
        cls, base: fstore.FeatureDataset, levels: tuple[str, ...], *, weights: str = "", device: str = "cpu"
    ) -> OnlineFeatures:
        """``base`` is a store Dataset built with ``levels=()`` (so no features are read)."""
        store = base.store
        return cls(base, levels, rebuild(store.manifest, [str(k) for k in store.keys], weights=weights, device=device), store.manifest)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, j: Any) -> dict[str, Any]:
        item = self.base[j]
        i, v = item["index"], item["view"]
        decoded = self.r.source.decode(self.r.refs[i])
        _, images = view_images(decoded, self.r.refs[i].key, self.m, only=v)  # (1 or T, 3, S, S)
        feats = self.r.backbone.forward(images)
        video = self.m.video
        item["features"] = {lv: (feats[lv] if video else feats[lv][0]).cpu() for lv in self.levels}
        return item
