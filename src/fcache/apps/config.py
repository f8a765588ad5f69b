"""The settings of ``fcache predict``, ``fcache export`` and ``fcache demo``, each written once: a field with its flag.

``fcache.cli`` builds each command's options from these fields (``options_of``), so the defaults, choices and help
live here only. Imports nothing heavy: the command line reads these classes at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcache.common.devices import DEVICE_HELP
from fcache.common.errors import ON_ERROR, InputError
from fcache.common.flags import check_flags, flag, required, split_csv
from fcache.extract.config import BackboneCompute, check_attention
from fcache.store.access import ReadAccess

FORMATS = ("pt2", "onnx", "safetensors")  # fcache export --format: torch.export, ONNX, the weights with their description


@dataclass(frozen=True)
class PredictConfig(ReadAccess, BackboneCompute):
    """``fcache predict RUN INPUT...``: where the predictions go and how they are made (``--storage-options``,
    ``--cache-dir``: for a store in object storage as the input)."""

    run: str
    inputs: tuple[str, ...]
    out: str = required("Folder for the predictions: new, empty, or an earlier predict's (whose files it replaces).", path="folder")
    weights: str = flag("", "The weights file of the run's store.", path="file", show_default=False)
    random_init: bool = flag(False, "The run was trained on random-init features: rebuild them (same seed).", show_default=False)
    device: str = flag("auto", DEVICE_HELP)
    batch_size: int = flag(8, "Images per backbone forward, and inputs per head batch.", min=1, max=65536)
    score_thr: float = flag(0.3, "Detection: keep (and draw) detections scoring this.", min=0, max=1)
    top_k: int = flag(5, "Video, classification: classes listed per input.", min=1, max=100_000)
    test_views: tuple[str, ...] = flag(
        (), "Segmentation, classification: also average the flip and/or ms views, as eval does.", parse=split_csv, text_default="",
        show_default=False,
    )  # fmt: skip
    clips: int | None = flag(None, "Video: temporal clips per video [default: the training store's].", show_default=False, min=1, max=256)
    crops: int | None = flag(None, "Video: spatial crops per clip [default: the training store's].", show_default=False, min=1, max=16)
    draw: bool = flag(False, "Also write overlays/<name>.png (with the ground truth beside, for a store with targets).", show_default=False)
    annotations: str = flag("", "Detection: a COCO json whose image ids the predictions should carry.", show_default=False)
    on_error: str = flag("skip", "skip: record an unreadable input in OUT/errors.jsonl and go on; fail: stop at the first.",
                         choices=ON_ERROR)  # fmt: skip

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "test_views", tuple(self.test_views))
        check_flags(self)
        self.check_access()
        if self.on_error not in ON_ERROR:
            raise InputError(f"--on-error {self.on_error}: use {' or '.join(ON_ERROR)}")
        check_attention(self.attention)


@dataclass(frozen=True)
class ExportConfig:
    """``fcache export RUN --out FILE``: the artifact and what it holds."""

    run: str
    out: str = required("The artifact; its JSON config goes beside it (FILE.json).", path="new-file")
    format: str = flag("pt2", "torch.export program, ONNX graph, or the weights with their description.", choices=FORMATS)
    head_only: bool = flag(False, "Export the head alone: its input is a dict of feature levels.", show_default=False)
    weights: str = flag("", "The weights file of the run's store.", path="file", show_default=False)
    random_init: bool = flag(False, "The run was trained on random-init features: rebuild them (same seed).", show_default=False)
    batch_size: int = flag(1, "Batch of the exported graph (shapes are fixed).", min=1, max=65536)

    def __post_init__(self) -> None:
        check_flags(self)
        if self.format not in FORMATS:
            raise InputError(f"--format {self.format}: choose one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class DemoConfig:
    """``fcache demo``: the embedded dataset, the extraction and the head trained from it."""

    out: str = flag("demo-output", "Folder for data, stores, run, report.", path="folder")
    iters: int = flag(120, "Training iterations of the head.", min=1, max=1_000_000)
    train_images: int = flag(48, "Images of the training set made from the photos.", min=1, max=100_000)
    val_images: int = flag(16, "Images of the validation set.", min=1, max=100_000)
    input_size: int = 256
    levels: tuple[str, ...] = ("p3", "p4", "p5")  # the shapes are 36-80 px wide: stride 8 is fine enough, and 4x cheaper
    head: str = "bifpn:layers=2,channels=64,rois=64,rpn_batch=128"
    batch_size: int = 4
    lr: float = 2e-3
    seed: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        check_flags(self)
