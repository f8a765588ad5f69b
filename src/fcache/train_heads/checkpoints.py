"""The checkpoints and weights of a RUN folder, each written atomically.

- ``checkpoint-<iteration>.pt``: model, optimiser, schedule, RNG states (and the EMA, gradient scaler and evaluation
  state when the run has them) at an iteration; the newest ``--keep-last`` are kept; loaded with
  ``torch.load(weights_only=True)``, never by unpickling. Runs of earlier fcache versions have one ``checkpoint.pt``.
- ``model.safetensors``: the weights of the newest checkpoint (the EMA weights with ``--ema``): what ``fcache eval``
  loads, with the run's record as metadata (``fcache.run``), so the file alone says what it is.
- ``best.safetensors``: the same for the evaluation with the best main metric (metadata: its iteration and value).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fcache.common.errors import InputError
from fcache.common.files import atomic_file
from fcache.train_heads.runrecord import TrainingRecord

MODEL, BEST = "model.safetensors", "best.safetensors"
CHECKPOINT = "checkpoint-{iteration}.pt"
OLD_CHECKPOINT = "checkpoint.pt"  # the one checkpoint of a run written before checkpoints were numbered
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")
RECORD_KEY = "fcache.run"  # safetensors metadata: the TrainingRecord as JSON


class Checkpoints:
    """The checkpoint and weights files of the RUN folder at ``path`` (a part of ``runfolder.RunDir``)."""

    path: Path

    def read_config(self) -> TrainingRecord | None:
        raise NotImplementedError  # the RUN folder's record, written into the weights' metadata

    def checkpoints(self) -> list[tuple[int, Path]]:
        """The numbered checkpoints in the folder, (iteration, path), oldest first."""
        found = [(int(m.group(1)), p) for p in self.path.glob("checkpoint-*.pt") if (m := CHECKPOINT_NAME.fullmatch(p.name))]
        return sorted(found)

    def checkpoint_path(self) -> Path | None:
        """The newest checkpoint (a run of an earlier fcache: its ``checkpoint.pt``); None without one."""
        numbered = self.checkpoints()
        if numbered:
            return numbered[-1][1]
        old = self.path / OLD_CHECKPOINT
        return old if old.is_file() else None

    def save_checkpoint(self, state: dict[str, Any], *, weights: dict[str, torch.Tensor] | None = None, keep: int = 1) -> None:
        """Write ``state`` (with ``iteration`` and ``model``) as checkpoint-<iteration>.pt and ``weights`` (default: the
        state's model) as model.safetensors, each atomically; then only the newest ``keep`` checkpoints stay."""
        self.path.mkdir(parents=True, exist_ok=True)
        iteration = int(state["iteration"])
        with atomic_file(self.path / CHECKPOINT.format(iteration=iteration)) as tmp:
            torch.save(state, tmp)
        self.save_weights(MODEL, state["model"] if weights is None else weights, {"iteration": str(iteration)})
        for _, p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)
        (self.path / OLD_CHECKPOINT).unlink(missing_ok=True)

    def save_best(self, weights: dict[str, torch.Tensor], iteration: int, metric: str, value: float) -> None:
        """best.safetensors: ``weights`` of the evaluation at ``iteration`` that scored ``value`` in ``metric``, the best so far."""
        self.save_weights(BEST, weights, {"iteration": str(iteration), "metric": metric, "value": repr(float(value))})

    def save_weights(self, name: str, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """RUN/``name`` as safetensors, atomically, with ``metadata`` and the run's record (``fcache.run``)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        record = self.read_config()
        if record is not None:
            metadata = metadata | {RECORD_KEY: json.dumps(record.to_dict(), sort_keys=True)}
        with atomic_file(self.path / name) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (None without one), loaded as tensors only (``weights_only``, never unpickled)."""
        p = self.checkpoint_path()
        if p is None:
            return None
        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of files it will refuse anyway
                warnings.simplefilter("ignore")
                state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a cut, garbage or hostile file: torch's own message may advise unsafe loading
            raise InputError(
                f"{p} is not a readable fcache checkpoint ({type(e).__name__}); it is damaged: delete it to train again"
            ) from None
        if not isinstance(state, dict) or not {"iteration", "model", "optimizer"} <= set(state):
            raise InputError(f"{p} is not an fcache checkpoint (no iteration, model and optimizer state); delete it to train again")
        return state

    def load_model(self, name: str = MODEL) -> tuple[dict[str, torch.Tensor], int]:
        """The saved weights (model.safetensors, or ``name``: best.safetensors) and the iteration they were saved at."""
        p = self.path / name
        if not p.is_file():
            raise InputError(f"{self.path} has no trained weights yet ({name}); train (or resume) until a checkpoint is written")
        try:
            with safe_open(str(p), framework="pt") as f:
                iteration = int((f.metadata() or {}).get("iteration", -1))
            return load_file(str(p)), iteration
        except Exception as e:  # a cut or garbage file (safetensors refuses anything else safely)
            raise InputError(
                f"{p} is not readable safetensors ({type(e).__name__}); it is damaged: resume the run to write it again"
            ) from None
