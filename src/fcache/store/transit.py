"""Stored values on their way to the training device: a level's values and side data as the store holds them (fp16,
bfloat16 bits, int8, the compact forms), batched, pinned, moved, and turned into float32 there by the form's torch
decode (``fcache.store.dtypes``), the first operation of a training step.

Training reads half the bytes (or less) it would read as float32 and the loader never converts: the decoding threads
write the stored values of a batch straight into its tensors (in shared memory inside a DataLoader worker, so the batch
reaches the training process without a copy; elsewhere into arrays reused once nothing holds them, ``Recycled``),
collation keeps those tensors (``stack``), and the training device decodes each level in one go: on a GPU after a copy
from pinned memory, on a CPU into float32 buffers reused from one batch to the next (``Buffers``). The float32 values
are the ones the numpy decode of the Dataset gives, bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fcache.store.dtypes import decode_torch


@dataclass(frozen=True)
class LevelCode:
    """How a level's stored values become float32: its form, its maps' width, and its basis (projected forms)."""

    form: str
    width: int
    basis: torch.Tensor | None = None  # (k + 1, C) float32

    def to(self, device: torch.device, non_blocking: bool = False) -> LevelCode:
        if self.basis is None or self.basis.device == device:
            return self
        return LevelCode(self.form, self.width, self.basis.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LevelCode:
        return self if self.basis is None else LevelCode(self.form, self.width, self.basis.pin_memory())


@dataclass(frozen=True)
class Stored:
    """A level's stored values (..., C', H, W') and side data (..., C) or (..., 1), of one item or a batch, with their code."""

    values: torch.Tensor
    side: torch.Tensor | None
    code: LevelCode = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The decoded float32 shape (..., C, H, W)."""
        c = self.values.shape[-3] if self.code.basis is None else self.code.basis.shape[1]
        return (*self.values.shape[:-3], c, self.values.shape[-2], self.code.width)

    def row(self, k: int) -> Stored:
        """Item ``k`` of a batch (views of its tensors: ``stack`` of a batch's rows in order gives the batch back)."""
        return Stored(self.values[k], None if self.side is None else self.side[k], self.code)

    def to(self, device: torch.device, non_blocking: bool = False) -> Stored:
        side = None if self.side is None else self.side.to(device, non_blocking=non_blocking)
        return Stored(self.values.to(device, non_blocking=non_blocking), side, self.code.to(device, non_blocking))

    def pin_memory(self) -> Stored:
        side = None if self.side is None else self.side.pin_memory()
        return Stored(self.values.pin_memory(), side, self.code.pin_memory())

    def decode(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 (..., C, H, W) on the values' device (into ``out`` when the form decodes value by value)."""
        c = self.code
        return decode_torch(self.values, c.form, self.side, c.width, c.basis, out=out)


class Buffers:
    """Float32 outputs of each level's decoding, reused from one batch to the next on a CPU (where a fresh array of a large
    batch costs its page faults again each time); other devices get fresh tensors from their caching allocator. A
    buffer is overwritten by the next batch: for a loop that holds one batch at a time."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def get(self, level: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        if device.type != "cpu":
            return None
        kept = self._kept.get(level)
        if kept is None or tuple(kept.shape) != shape:
            kept = self._kept[level] = torch.empty(shape, dtype=torch.float32)
        return kept


def decode(stored: Stored, level: str, buffers: Buffers | None) -> torch.Tensor:
    """``stored`` as float32 on its device, into ``buffers``' buffer of ``level`` when given."""
    return stored.decode(None if buffers is None else buffers.get(level, stored.shape, stored.values.device))


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype holding a stored numpy dtype's values (raw 16-bit words as int16: bfloat16 bits, bf16 scales)."""
    return torch.from_numpy(np.empty(0, np.int16 if dtype == np.uint16 else dtype)).dtype


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, which its caller fills whole: inside a DataLoader worker in shared memory, so it reaches
    the training process without a copy (what torch's default collation does); elsewhere one of ``recycled()``'s."""
    if torch.utils.data.get_worker_info() is None:
        return recycled().empty(tuple(shape), dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, tuple(shape), strides)


class Recycled:
    """Arrays for the batches a process reads, each handed out again once nothing holds it any more.

    A batch of SwinV2-L@1024 features is hundreds of MB: a fresh array costs the kernel a fault and a zeroed page per
    4 KB every batch (a quarter of the CPU time of reading it, measured at shape B of ``benchmarks/read_speed.py``). An
    array is handed out as a tensor over it (``torch.from_numpy``), which, with every view, row and storage made from
    it, holds a reference to the array: the array is free when only this pool refers to it. The ``KEPT`` most recently
    used arrays are kept; their values are whatever the last batch left, and every caller overwrites all of them."""

    KEPT = 32  # four batches of four levels with side data: the one read, two read ahead (``Prefetch``), the loop's

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []  # least recently handed out first
        self._probe = [np.empty(0)]
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        np_dtype = _numpy_dtype(dtype)
        if np_dtype is None:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            for k in reversed(range(len(self._arrays))):  # the most recently used first: its pages are the warmest
                if self._arrays[k].shape == shape and self._arrays[k].dtype == np_dtype and self._free(k):
                    self._arrays.append(self._arrays.pop(k))
                    return torch.from_numpy(self._arrays[-1])
            array = torch.empty(shape, dtype=dtype).numpy()  # not np.empty: numpy asks for huge pages, slower to fault in
            self._arrays.append(array)
            del self._arrays[: -self.KEPT]
            return torch.from_numpy(array)

    def _free(self, k: int) -> bool:
        """Whether only the list refers to array k: counted the way a probe held only by a list is."""
        return sys.getrefcount(self._arrays[k]) == sys.getrefcount(self._probe[0])


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16 and other dtypes numpy lacks
        return None


_RECYCLED: tuple[int, Recycled] | None = None


def recycled() -> Recycled:
    """This process's ``Recycled`` arrays (a forked child makes its own)."""
    global _RECYCLED
    if _RECYCLED is None or _RECYCLED[0] != os.getpid():
        _RECYCLED = (os.getpid(), Recycled())
    return _RECYCLED[1]


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``; the rows' own tensor when they are its consecutive rows, all of them (a batch read at once)."""
    base = rows[0]._base
    if (
        base is not None
        and base.is_contiguous()
        and base.shape[0] == len(rows)
        and all(
            r._base is base and r.shape == base.shape[1:] and r.storage_offset() == base.storage_offset() + k * base.stride(0)
            for k, r in enumerate(rows)
        )
    ):
        return base
    return torch.stack(list(rows), out=empty((len(rows), *rows[0].shape), rows[0].dtype))


def stack(items: Sequence[Stored]) -> Stored:
    """Items' stored values of one level as one batch (the batch they were read as, when they are its rows in order)."""
    code = items[0].code
    assert all(it.code.form == code.form for it in items), "one level, one form"
    side = None if items[0].side is None else stack_rows([it.side for it in items if it.side is not None])
    return Stored(stack_rows([it.values for it in items]), side, code)
