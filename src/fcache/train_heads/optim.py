"""What a training step needs besides the optimiser: the autocast dtype of ``--precision``, the gradient scaler of fp16
and the exponential moving average of the weights (``--ema``), each from torch (``torch.autocast``,
``torch.amp.GradScaler``, ``torch.optim.swa_utils.AveragedModel``).

``auto`` is bf16 autocast on CUDA and float32 elsewhere; fp16 scales the loss (``GradScaler``) so small gradients
survive float16, for GPUs without bf16 (T4, V100). A disabled scaler passes everything through, so the fp32 and bf16
steps are the plain ones. The EMA starts as the weights after the first step and then follows ``ema = decay * ema +
(1 - decay) * weights`` after every optimiser step, buffers included (timm's ModelEmaV2 averages them too).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fcache.common.errors import InputError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype ``precision`` computes in on ``device``; None for float32 throughout."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return DTYPES[precision]


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of ``precision`` on ``device`` (disabled for float32)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) is torch.float16)


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision this torch cannot autocast to on ``device`` (e.g. fp16 on a CPU of an older torch)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns, then silently runs float32, for a dtype it cannot autocast to
            with torch.autocast(device_type=device.type, dtype=dtype):
                pass
            if dtype is torch.float16:
                torch.amp.GradScaler(device.type)
    except (RuntimeError, UserWarning) as e:
        first = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise InputError(
            f"--precision {precision}: this torch cannot autocast to it on {device.type} ({first}); use fp32 or bf16"
        ) from None


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """The moving average of ``model``'s parameters and buffers (a copy, updated by ``update_parameters(model)``)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def no_sync(net: nn.Module, sync: bool) -> Any:
    """DDP's ``no_sync`` when this backward need not all-reduce (all but an iteration's last micro-batch)."""
    return contextlib.nullcontext() if sync or not hasattr(net, "no_sync") else cast(Any, net).no_sync()
