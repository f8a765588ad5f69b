"""One head on many GPUs: torchrun's environment, the process group, DistributedDataParallel and the few collectives
the loop needs. Follows PyTorch's DDP tutorial (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; NCCL on CUDA, gloo on CPU).

Every rank reads its own slice of each global batch (``TrainBatches(rank=, world=)``) and DDP averages the gradients,
so a head whose loss is a mean over samples follows single-process training with the same global batch. Rank 0 writes
the RUN folder (config, checkpoints with every rank's RNG state, metrics) and evaluates, also during training (the
others wait for it at the next collective, and learn from it whether to stop early); the others only train.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fcache.common.errors import FcacheError, InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes: one process is ``Dist()``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Dist:
        """The place torchrun gives (RANK, WORLD_SIZE, LOCAL_RANK); one process when they are not set."""
        env = os.environ if env is None else env
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


SINGLE = Dist()
TIMEOUT = datetime.timedelta(hours=2)  # the other ranks wait at the next collective while rank 0 evaluates


@contextmanager
def process_group(d: Dist, device: str) -> Iterator[None]:
    """Join the process group for the run (nothing to do for one process): NCCL with one GPU per rank, else gloo."""
    if not d.enabled:
        yield
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(d.local_rank)  # "cuda" then means this rank's GPU
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        tdist.destroy_process_group()


class HeadDDP(DistributedDataParallel):
    """DDP whose missing attributes come from the head, so ``task.loss`` may call ``model.losses(...)`` as usual."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """``model`` for one process; else DDP over it (BatchNorm made SyncBatchNorm on CUDA; gloo has no SyncBatchNorm).

    ``find_unused_parameters``: a detection head may leave a branch without gradient in a step (no positive RoI).
    """
    if not d.enabled:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same Parameter objects, modules replaced in place
    ids = [d.local_rank] if device.type == "cuda" else None
    return HeadDDP(model, device_ids=ids, find_unused_parameters=True)


def mean(values: Mapping[str, float], d: Dist, device: torch.device) -> dict[str, float]:
    """``values`` averaged over the ranks (every rank logs the same losses); unchanged for one process."""
    if not d.enabled:
        return dict(values)
    keys = sorted(values)
    on = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=on)
    tdist.all_reduce(t)
    return dict(zip(keys, (t / d.world).tolist(), strict=True))


def gather(obj: T, d: Dist) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T], d: Dist) -> T | None:
    """Run ``fn`` on rank 0 only; a ValueError it raises is raised on every rank (no rank is left waiting)."""
    result, message = None, None
    if d.is_main:
        try:
            result = fn()
        except FcacheError as e:
            message = str(e)
    if d.enabled:
        box = [message]
        tdist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise InputError(message)
    return result


def from_main(value: T, d: Dist) -> T:
    """Rank 0's ``value`` on every rank (e.g. whether to stop); ``value`` itself for one process."""
    if not d.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def own_rng(checkpoint: Mapping[str, Any], d: Dist) -> Any:
    """This rank's RNG state in ``checkpoint`` (``rng_ranks`` holds every rank's when several processes wrote it)."""
    states = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(states) != d.world:
        raise InputError(
            f"the checkpoint was written by {len(states)} training process(es) and this run has {d.world}; "
            f"resume with the same number (torchrun --nproc-per-node {len(states)}) to continue bit-exactly"
        )
    return states[d.rank]


def check_batch(batch_size: int, d: Dist) -> None:
    """Every rank takes an equal slice of each global batch."""
    if batch_size % d.world:
        raise InputError(
            f"--batch-size {batch_size} (the global batch) does not split evenly over {d.world} processes; use a multiple of {d.world}"
        )


def is_main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0 (which prints nothing)."""
    return Dist.from_env().is_main
