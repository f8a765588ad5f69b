"""The torch Dataset of a store (``FeatureStore.dataset``): items of float32 features, or of the stored values a training
device decodes (``stored=True``: ``fcache.store.transit``), with geometry and targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from fcache.store.reader import FeatureStore


class FeatureDataset(torch.utils.data.Dataset):
    """Items ``{"index", "view", "features": {level: float32 tensor}, "geometry", "targets"}``.

    Item ``j`` is sample ``indices[j]``. Its view is ``view`` when an int; with ``view="random"``
    one of ``views`` drawn from (seed, epoch, sample), so each epoch sees a fresh view of every
    sample, reproducibly. An item may also be asked for as ``(j, view)``. Safe in DataLoader workers.
    With ``stored=True`` each level is a ``fcache.store.transit.Stored`` instead (the stored values and side data, which
    ``Stored.decode`` turns into the same float32 tensor, bit for bit): what training reads, to decode on its device.
    """

    def __init__(
        self,
        store: FeatureStore,
        levels: Sequence[str] | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        view: int | str = 0,
        views: Sequence[int] | None = None,
        seed: int = 0,
        targets: Sequence[str] = (),
        stored: bool = False,
    ) -> None:
        self.store = store
        self.levels = tuple(levels) if levels is not None else store.level_names
        for lv in self.levels:
            store.manifest.level(lv)
        self.indices = np.asarray(store.ok_indices if indices is None else indices, dtype=np.int64)
        if isinstance(view, str) and view != "random":
            raise ValueError(f"view must be an int or 'random', got {view!r}")
        self.view = view
        self.views = tuple(views) if views is not None else store.manifest.train_views
        self.seed, self.epoch = seed, 0
        self.targets = tuple(targets)
        self.stored = stored

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def view_of(self, i: int, epoch: int | None = None) -> int:
        """The view of sample ``i`` in ``epoch`` (the current one by default)."""
        if self.view != "random":
            return int(self.view)
        rng = np.random.default_rng((self.seed, self.epoch if epoch is None else epoch, int(i)))
        return int(self.views[rng.integers(len(self.views))])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> list[dict[str, Any]]:
        """Several items at once (a DataLoader batch): all their levels are read and decoded together (``read_many``, or
        ``read_stored`` into one tensor per level that collation keeps); a remote store reads their targets concurrently too."""
        picked = self.picked(items)
        features = features_of(self.store, self.levels, picked, stored=self.stored)
        if self.store.backend.remote:
            targets = {name: self.store.targets_many(name, [i for i, _ in picked]) for name in self.targets}
        else:
            targets = {name: [self.store.target(name, i) for i, _ in picked] for name in self.targets}
        return [
            {
                "index": i,
                "view": v,
                "features": features[k],
                "geometry": torch.from_numpy(self.store.geometry_rows(i)[v].copy()),
                "targets": {name: targets[name][k] for name in self.targets},
            }
            for k, (i, v) in enumerate(picked)
        ]

    def picked(self, items: Sequence[int | tuple[int, int]], epoch: int | None = None) -> list[tuple[int, int | None]]:
        """The (sample, view) of each item in ``epoch`` (the current one by default)."""
        picked: list[tuple[int, int | None]] = []
        for item in items:
            j, v = item if isinstance(item, tuple) else (item, None)
            i = int(self.indices[j])
            picked.append((i, self.view_of(i, epoch) if v is None else int(v)))
        return picked

    def requests(self, items: Sequence[int | tuple[int, int]], epoch: int | None = None) -> list[tuple[str, int, int | None]]:
        """The store requests reading ``items`` makes, in its order (what ``FeatureStore.expect`` is told)."""
        return [(lv, i, v) for i, v in self.picked(items, epoch) for lv in self.levels] if self.stored else []


def features_of(
    store: FeatureStore, levels: Sequence[str], picked: Sequence[tuple[int, int | None]], *, stored: bool
) -> list[dict[str, Any]]:
    """Each (sample, view) of ``picked``'s features by level (view None: all views): float32 tensors, or with ``stored``
    the rows of one ``Stored`` batch per level."""
    if not levels:
        return [{} for _ in picked]
    if stored:
        batch = store.read_stored(levels, picked)
        return [{lv: batch[lv].row(k) for lv in levels} for k in range(len(picked))]
    values = store.read_many([(lv, i, v) for i, v in picked for lv in levels])
    return [{lv: torch.from_numpy(values[k * len(levels) + j]) for j, lv in enumerate(levels)} for k in range(len(picked))]
