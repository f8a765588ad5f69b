"""What the loop and evaluation read: the one training-loader recipe, and the evaluation datasets.

Training (:func:`train_loader`): a DataLoader over ``EpochItems`` (item ``(epoch, j)``: sample j with the view of that
epoch) whose batches come from ``TrainBatches`` (one seeded permutation per epoch, cut into full batches, from any
iteration on, optionally one rank's slice) and are collated by ``Collate`` (task targets computed in the workers).
The batch order is a pure function of (seed, iteration), which is what makes resume bit-exact. Features travel as the
store's values (fp16, bfloat16 bits, int8, the compact forms: half the bytes of float32 or less, decompressed straight
into the batch's tensors, pinned for a GPU) and become float32 on the training device, the first operation of a step
(``Batch.to``, ``fcache.store.transit``): the same float32 values, bit for bit, as the Dataset's own decoding.

Evaluation (:func:`eval_data`): view 0 of every ok sample, or, for a task whose ``TaskDef.eval_views`` is ``all``,
items with every view of a sample at once (``AllViews``), so the task can average them (segmentation's ms+flip,
video's clip x crop protocol, classification's test views). An ``AllViews`` item is shaped like a ``FeatureDataset``
item except that each level holds all V views, (V, C, H, W) or for video (V, T, C, H, W); ``geometry`` is view 0's;
every view's geometry, the view names and the sample's key travel in ``targets`` under ``VIEW_GEOMETRY``,
``VIEW_NAMES`` and ``KEY``. Evaluation datasets hold stored values too.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fcache.common.errors import InputError
from fcache.spec import GEOMETRY_FIELDS, Geometry, LevelSpec
from fcache.store import FeatureStore
from fcache.store.dataset import features_of
from fcache.store.readahead import READ_AHEAD
from fcache.store.transit import Stored, stack, stack_rows
from fcache.train_heads.task import Batch, Task

KEY = "key"  # the sample's source id (samples/key)
VIEW_GEOMETRY = "view_geometry"  # (V, len(GEOMETRY_FIELDS)) float32
VIEW_NAMES = "view_names"  # the V names of manifest.view_names


@dataclass
class Collate:
    """DataLoader collate_fn: items -> Batch (task targets computed in the worker). Float32 features are stacked per
    level; stored values (``fcache.store.transit.Stored``) stay stored, in the tensor they were read into when the items
    are the rows of one read, for the device to decode (``Batch.to``). Inside a worker a batch is made in shared memory."""

    task: Task
    with_targets: bool = True

    def __call__(self, items: list[Mapping[str, Any]]) -> Batch:
        geometry = [Geometry.from_array(np.asarray(it["geometry"])) for it in items]
        levels = items[0]["features"]
        features = {lv: stack_rows([it["features"][lv] for it in items]) for lv, x in levels.items() if not isinstance(x, Stored)}
        stored = {lv: stack([it["features"][lv] for it in items]) for lv, x in levels.items() if isinstance(x, Stored)}
        targets = [self.task.targets(it, g) for it, g in zip(items, geometry, strict=True)] if self.with_targets else []
        raw = [dict(it.get("targets", {})) for it in items]
        return Batch([int(it["index"]) for it in items], [int(it["view"]) for it in items], features, geometry, targets, raw, stored)


class Plan(Protocol):
    """The order a DataLoader's batches come in: batch ``it``'s keys, and which batch some keys are."""

    @property
    def stop(self) -> int: ...

    def batch(self, it: int) -> list[Any]: ...

    def iteration_of(self, keys: Sequence[Any]) -> int | None: ...


class ReadsAhead(Dataset):
    """Items of a store's Dataset whose batches come in a known order (``plan``). With ``read_ahead`` > 0, a process reading a
    store in object storage tells the store, at a batch it did not expect, the requests of that batch and of every one it
    will be handed after it (a DataLoader hands a worker every ``num_workers``-th batch, in order), so that they are read
    ahead, ``read_ahead`` range requests in flight across batch boundaries (``FeatureStore.expect``: a wrong guess
    costs requests, never values)."""

    def __init__(self, data: Dataset, plan: Plan | None, read_ahead: int) -> None:
        self.data, self.plan, self.read_ahead = data, copy.copy(plan), read_ahead
        self._next: tuple[int, int] | None = None  # (process, the batch it expects next)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def requests_of(self, keys: list[Any]) -> Iterator[tuple[str, int, int | None]]:
        """The store requests reading the batch ``keys`` makes, in its order."""
        yield from self.data.requests(keys)  # type: ignore[attr-defined]

    def expect(self, keys: list[Any]) -> None:
        """At a batch the store is not reading ahead for: tell it this one and every one this process will be handed next."""
        store = getattr(self.data, "store", None)
        if not self.read_ahead or self.plan is None or store is None or not store.backend.remote or not hasattr(self.data, "requests"):
            return
        step = getattr(torch.utils.data.get_worker_info(), "num_workers", 1)
        if store.expecting and self._next is not None and self._next[0] == os.getpid() and self.plan.batch(self._next[1]) == keys:
            self._next = (os.getpid(), self._next[1] + step)
            return
        it = self.plan.iteration_of(keys)
        self._next = None if it is None else (os.getpid(), it + step)
        store.expect(None if it is None else self._requests(range(it, self.plan.stop, step)), self.read_ahead)

    def _requests(self, iterations: range) -> Iterator[tuple[str, int, int | None]]:
        assert self.plan is not None
        for it in iterations:
            yield from self.requests_of(self.plan.batch(it))

    def close(self) -> None:
        """Stop reading ahead in this process."""
        store = getattr(self.data, "store", None)
        if store is not None and self.read_ahead:
            store.expect(None)


class EpochItems(ReadsAhead):
    """Item ``(epoch, j)`` is ``data[j]`` as seen in ``epoch`` (``set_epoch`` picks its view). Stateless across workers.
    Its batches are read ahead in the order of ``plan`` (``TrainBatches``) when given."""

    def __init__(self, data: Dataset, plan: TrainBatches | None = None, read_ahead: int = 0) -> None:
        super().__init__(data, plan, read_ahead)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, j = key
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)
        return self.data[j]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch: read at once where the dataset can (``FeatureDataset``: concurrent requests to a remote store)."""
        many = getattr(self.data, "__getitems__", None)
        if many is None:
            return [self[k] for k in keys]
        self.expect(keys)
        out: list[Any] = []
        for epoch in dict.fromkeys(e for e, _ in keys):  # a batch spans at most two epochs
            if hasattr(self.data, "set_epoch"):
                self.data.set_epoch(epoch)
            out += many([j for e, j in keys if e == epoch])
        return out

    def requests_of(self, keys: list[tuple[int, int]]) -> Iterator[tuple[str, int, int | None]]:
        for epoch in dict.fromkeys(e for e, _ in keys):
            yield from self.data.requests([j for e, j in keys if e == epoch], epoch)  # type: ignore[attr-defined]


class InOrder(ReadsAhead):
    """Items ``data[indices[k]]`` (every item by default) read in batches of ``batch_size`` in order (evaluation, predict,
    cka), read ahead from a store in object storage."""

    def __init__(self, data: Dataset, batch_size: int, read_ahead: int = READ_AHEAD, indices: Sequence[int] | None = None) -> None:
        self.indices = list(range(len(data))) if indices is None else [int(j) for j in indices]  # type: ignore[arg-type]
        super().__init__(data, InBatches(len(self.indices), batch_size), read_ahead)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Any:
        return self.data[self.indices[k]]

    def __getitems__(self, ks: list[int]) -> list[Any]:
        self.expect(list(ks))
        js = [self.indices[k] for k in ks]
        many = getattr(self.data, "__getitems__", None)
        return many(js) if many is not None else [self.data[j] for j in js]

    def requests_of(self, keys: list[int]) -> Iterator[tuple[str, int, int | None]]:
        yield from self.data.requests([self.indices[k] for k in keys])  # type: ignore[attr-defined]


@dataclass(frozen=True)
class InBatches:
    """Items ``0..n-1`` in order, in batches of ``batch_size`` (a DataLoader's ``batch_size`` without shuffling)."""

    n: int
    batch_size: int

    @property
    def stop(self) -> int:
        return -(-self.n // self.batch_size)

    def batch(self, it: int) -> list[int]:
        return list(range(it * self.batch_size, min(self.n, (it + 1) * self.batch_size)))

    def iteration_of(self, keys: Sequence[int]) -> int | None:
        it = int(keys[0]) // self.batch_size
        return it if self.batch(it) == list(keys) else None


class TrainBatches(Sampler[list[tuple[int, int]]]):
    """Batches ``start..stop-1`` of the stream made of one seeded permutation per epoch, cut into full batches.

    Batch ``it`` holds stream positions ``it*B .. it*B+B-1``; position p is item ``perm(seed, p // n)[p % n]``
    of epoch ``p // n``. A resumed run starts at its iteration without reading what came before. With ``world``
    processes, rank r takes the r-th of ``world`` equal consecutive slices of each batch (B must divide evenly).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, *, rank: int = 0, world: int = 1) -> None:
        assert batch_size % world == 0, "ddp.check_batch refuses uneven slices first"
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world
        self._perm: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's permutation and its inverse."""
        kept = self._perm
        if kept is None or kept[0] != epoch:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            kept = self._perm = (epoch, perm, np.argsort(perm))
        return kept[1], kept[2]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            yield self.batch(it)

    def batch(self, it: int) -> list[tuple[int, int]]:
        """Batch ``it``: its (epoch, item) keys."""
        local = self.batch_size // self.world
        first = it * self.batch_size + self.rank * local
        return [(p // self.n, int(self._order(p // self.n)[0][p % self.n])) for p in range(first, first + local)]

    def iteration_of(self, keys: Sequence[tuple[int, int]]) -> int | None:
        """Which batch ``keys`` is (None: none of these)."""
        epoch, j = keys[0]
        p = epoch * self.n + int(self._order(epoch)[1][j]) - self.rank * (self.batch_size // self.world)
        it = p // self.batch_size
        return it if self.start <= it < self.stop and self.batch(it) == list(keys) else None


def train_loader(
    data: Dataset,
    task: Task,
    *,
    batch_size: int,
    seed: int,
    start: int,
    stop: int,
    num_workers: int,
    prefetch: int = 2,
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
    read_ahead: int = READ_AHEAD,
) -> DataLoader | Prefetch:
    """Batches ``start..stop-1`` of ``data`` (items with their epoch's view), collated with ``task``'s training targets.

    The loader never touches the global RNG (its own generator is seeded), so heads sampling from it stay exact.
    Each worker reads ``prefetch`` batches ahead; without workers, a store in object storage is still read
    ``prefetch`` batches ahead, by a thread (``Prefetch``), so the head never waits on the network. From a store in
    object storage each reading process also keeps ``read_ahead`` range requests in flight over the batches it will be
    handed (``EpochItems``; 0: batch by batch).
    """
    plan = TrainBatches(len(data), batch_size, seed, start, stop, rank=rank, world=world)  # type: ignore[arg-type]
    loader = DataLoader(
        EpochItems(data, plan, read_ahead),
        batch_sampler=plan,
        collate_fn=Collate(task, with_targets=True),
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None,
        pin_memory=device is not None and device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    store = getattr(data, "store", None)
    if num_workers == 0 and store is not None and store.backend.remote:
        return Prefetch(loader, prefetch)
    return loader


class Prefetch:
    """The batches of ``loader``, read up to ``depth`` ahead by a background thread (the same batches, in order)."""

    def __init__(self, loader: DataLoader, depth: int) -> None:
        self.loader, self.depth = loader, max(1, depth)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        ahead: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def read() -> None:
            try:
                for batch in self.loader:
                    while not stop.is_set():
                        try:
                            ahead.put(("batch", batch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ahead.put(("end", None))
            except BaseException as e:  # noqa: BLE001 - raised in the consuming thread
                ahead.put(("error", e))

        thread = threading.Thread(target=read, name="fcache-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = ahead.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    ahead.get(timeout=0.1)
            close = getattr(self.loader.dataset, "close", None)
            if close is not None:
                close()


def training_items(store: FeatureStore, task: Task, indices: np.ndarray, levels: Sequence[str], seed: int) -> Any:
    """The store's Dataset of the chosen samples; with several training views, one drawn per sample and epoch. Its items
    hold the stored values, which the loop decodes on its device (``Batch.to``).

    ``levels=()`` gives the same items without features (for features computed online).
    """
    views = store.manifest.train_views
    view = "random" if len(views) > 1 else 0
    return store.dataset(list(levels), indices=indices.tolist(), view=view, views=views, seed=seed, targets=task.target_names, stored=True)


class AllViews(Dataset):
    """Ok samples of ``store`` with all their views: video clip x crop views, or an image's plain view and its test views."""

    def __init__(self, store: FeatureStore, levels: Sequence[str], targets: Sequence[str]) -> None:
        self.store, self.levels, self.targets = store, tuple(levels), tuple(targets)
        self.indices = np.asarray(store.ok_indices, dtype=np.int64)
        self.view_names = tuple(store.manifest.view_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        return self.__getitems__([j])[0]

    def requests(self, js: Sequence[int], epoch: int | None = None) -> list[tuple[str, int, int | None]]:
        """The store requests reading items ``js`` makes, in its order (``FeatureStore.expect``)."""
        return [(lv, int(self.indices[j]), None) for j in js for lv in self.levels]

    def __getitems__(self, js: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of samples, every view of every level read at once (concurrently from a remote store)."""
        picked = [int(self.indices[j]) for j in js]
        features = features_of(self.store, self.levels, [(i, None) for i in picked], stored=True)  # each (V, ...)
        out = []
        for k, i in enumerate(picked):
            geometry = self.store.geometry_array[i]  # (V, fields)
            targets: dict[str, Any] = {name: self.store.target(name, i) for name in self.targets}
            targets |= {KEY: str(self.store.keys[i]), VIEW_GEOMETRY: geometry.copy(), VIEW_NAMES: self.view_names}
            out.append(
                {
                    "index": i,
                    "view": 0,
                    "features": features[k],
                    "geometry": torch.from_numpy(geometry[0].copy()),
                    "targets": targets,
                }
            )
        return out


def check_plain_view(store: FeatureStore) -> None:
    """Evaluation reads view 0, which must be the plain resize + pad of every sample (no crop, no flip, longest side fits)."""
    g = store.geometry_array[store.ok_indices, 0]  # (n, len(GEOMETRY_FIELDS))
    f = {name: g[:, k] for k, name in enumerate(GEOMETRY_FIELDS)}
    fits = np.isclose(f["scale"] * np.maximum(f["orig_h"], f["orig_w"]), f["canvas"], rtol=1e-3)
    plain = (f["crop_x0"] == 0) & (f["crop_y0"] == 0) & (f["flip"] == 0) & fits
    if not plain.all():
        raise InputError(
            f"{store.root}: view 0 of {int((~plain).sum())} sample(s) is a random crop or flip, not the plain resize + pad; "
            "evaluate on a store extracted with --views 1"
        )


def eval_data(store: FeatureStore, task: Task, levels: tuple[LevelSpec, ...], views: str = "plain") -> Dataset:
    """What a task is scored on: view 0 of every ok sample, or (``views="all"``) every view of each at once."""
    if len(store.ok_indices) == 0:
        raise InputError(f"{store.root} has no usable samples to evaluate on")
    if not store.video:  # a video view is a clip x crop by construction
        check_plain_view(store)
    names = [lv.name for lv in levels]
    if views == "all":
        return AllViews(store, names, task.eval_target_names)
    return store.dataset(names, view=0, targets=task.eval_target_names, stored=True)
