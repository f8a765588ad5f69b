"""``--device``, with one meaning in every command: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``
(the current GPU), ``cuda:K`` or ``mps``. A device that is not there is refused before anything is written."""

from __future__ import annotations

from fcache.common.errors import InputError

DEVICE_HELP = "auto (CUDA when available, else cpu), cpu, cuda, cuda:K or mps."


def resolve_device(name: str) -> str:
    """The device ``name`` stands for here, checked: ``cpu``, ``cuda``, ``cuda:K`` or ``mps``.

    Raises:
        InputError: an unknown name, or a device this machine does not have.
    """
    if name == "cpu":
        return name
    import torch

    kind, _, index = name.partition(":")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
        return name
    raise InputError(f"--device {name!r} is not a device; use {DEVICE_HELP}")


def peak_memory_gb(device: str) -> float:
    """Peak memory of this process so far, in GB: ``torch.cuda.max_memory_allocated`` on a CUDA ``device`` (tensors
    only, as PyTorch's allocator counts them), else the peak resident set size (``getrusage``: the whole process, not
    its DataLoader workers)."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
