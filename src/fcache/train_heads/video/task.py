"""The video action recognition task (Kinetics-400; paper §5.1, Table 4, Table 13): the HEADS table and the loop's Task.

Head specs: ``linear[:level=p5,dropout=0.5]``, ``temporal[:blocks=4,dim=0,heads=0,drop_path=0.2,dropout=0.5,level=p5]``
and ``global[...]`` with the same keys. ``dim=0`` is the level's channels, at most 1024 (SwinV2-T/S/B keep theirs,
SwinV2-L's 1536 and SwinV2-G's 4096 are projected to 1024); ``heads=0`` is ``dim // 32`` (Swin's head width).
Training defaults, Table 13 (frozen): batch 64, AdamW lr 3e-4, weight decay 0.05, cosine decay, 2.5 warm-up epochs,
turned into ``ceil(2.5 * training samples / batch)`` iterations when the run starts. Training reads one clip x crop
view per sample and epoch (``FeatureDataset(view="random")`` over every stored view); evaluation averages the softmax
scores of all of them (the 4 x 3 testing of Video Swin) and also scores each view alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.spec import Geometry, LevelSpec
from fcache.store import FeatureStore
from fcache.train_heads.classification.outputs import OUTPUTS, per_class, pictures
from fcache.train_heads.classification.scoring import AVERAGED, TOPK_NAMES
from fcache.train_heads.classification.task import LEVEL, LabelTask, check_labels, check_same_classes, find_level
from fcache.train_heads.headspec import HeadDef, HeadSpec, Param
from fcache.train_heads.task import ExportDef, TaskDef
from fcache.train_heads.video.model import HEAD_DIM, GlobalHead, TemporalHead, VideoLinear
from fcache.train_heads.video.synthetic import BENCH

MAX_DIM = 1024
DROPOUT = Param(0.5, kind="prob", help="dropout before the classifier (Video Swin's head)")
BLOCK_PARAMS: dict[str, Param] = {
    "level": LEVEL,
    "blocks": Param(4, maximum=64, help="Transformer blocks (Table 4: 4)"),
    "dim": Param(0, minimum=0, maximum=8192, help=f"embedding width; 0: the level's channels, at most {MAX_DIM}"),
    "heads": Param(0, minimum=0, maximum=256, help=f"attention heads; 0: dim // {HEAD_DIM}"),
    "drop_path": Param(0.2, kind="prob", help="stochastic depth of the last block, from 0 at the first (Table 13)"),
    "dropout": DROPOUT,
}


def _linear(task: VideoTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    (level,) = levels
    return VideoLinear(level.channels, task.num_classes, task.head["dropout"])


def _blocks(task: VideoTask, levels: tuple[LevelSpec, ...]) -> nn.Module:
    (level,) = levels
    p = task.head
    dim, heads = task.widths(level.channels)
    common = {
        "frames": task.frames,
        "blocks": p["blocks"],
        "dim": dim,
        "heads": heads,
        "drop_path": p["drop_path"],
        "dropout": p["dropout"],
    }
    try:
        if p.name == "temporal":
            return TemporalHead(level.channels, task.num_classes, **common)
        return GlobalHead(level.channels, task.num_classes, grid=task.grid, **common)
    except ValueError as e:
        raise InputError(f"head {p}: {e}") from None


HEADS: dict[str, HeadDef] = {
    "linear": HeadDef({"level": LEVEL, "dropout": DROPOUT}, _linear),
    "temporal": HeadDef(BLOCK_PARAMS, _blocks),
    "global": HeadDef(BLOCK_PARAMS, _blocks),
}


def parse_video_head(text: str) -> HeadSpec:
    return TASK.parse(text)


class VideoTask(LabelTask):
    """Action recognition from per-frame features (T, C, H, W) of one level, scored by multi-view top-1 / top-5."""

    name = "video"
    view_ndim = 4

    def __init__(self, head: HeadSpec, label_names: Sequence[str], frames: int, grid: tuple[int, int]) -> None:
        super().__init__(head, label_names)
        self.frames, self.grid = int(frames), (int(grid[0]), int(grid[1]))

    @classmethod
    def from_store(cls, store: FeatureStore, head: str) -> VideoTask:
        check_store(store)
        spec = parse_video_head(head)
        frames, _, h, w = store.manifest.level_shape(find_level(spec, store.levels).name)
        return cls(spec, store.manifest.dataset.label_names, frames, (h, w))

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> VideoTask:
        return cls(parse_video_head(d["head"]), d["label_names"], d["frames"], (int(d["grid"][0]), int(d["grid"][1])))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "frames": self.frames, "grid": list(self.grid)}

    def widths(self, channels: int) -> tuple[int, int]:
        """(dim, heads) of a block head over ``channels``, the 0 defaults resolved."""
        dim = self.head["dim"] or min(channels, MAX_DIM)
        return dim, self.head["heads"] or max(1, dim // HEAD_DIM)

    def build(self, levels: tuple[LevelSpec, ...]) -> nn.Module:
        return HEADS[self.head.name].build(self, levels)

    def logits(self, model: nn.Module, x: Tensor, geometry: Sequence[Geometry]) -> Tensor:
        return model(x)  # (n, T, C, H, W) -> (n, K); every crop fills the canvas, nothing to mask


def clip_logits(head: nn.Module, features: dict[str, Tensor], canvas: int) -> Tensor:
    """The exported graph: (B, K) logits of one clip x crop view per sample."""
    (x,) = features.values()  # (B, T, C, H, W)
    return head(x)


def check_store(store: FeatureStore) -> None:
    """The store can train or evaluate a video head: per-frame features of labelled clips."""
    if not store.video:
        raise InputError(f"{store.root} is an image store; --task video needs per-frame features of clips (fcache extract --dataset video)")
    check_labels(store, "video", "videos in class folders or a path,label CSV (fcache extract --dataset video)")


def check_eval_store(task: VideoTask, store: FeatureStore) -> None:
    """``store`` can score ``task``'s head: labelled clips of the same classes, frames and (global head) spatial grid."""
    check_store(store)
    check_same_classes(task, store)
    if task.level not in store.level_names:
        return  # run.check_levels names the missing level
    frames, _, h, w = store.manifest.level_shape(task.level)
    if task.head.name != "linear" and frames != task.frames:
        raise InputError(
            f"{store.root} has clips of {frames} frames but the head learned {task.frames}; extract it with --frames {task.frames}"
        )
    if task.head.name == "global" and (h, w) != task.grid:
        raise InputError(
            f"{store.root} has {task.level} maps of {h}x{w} but the head learned {task.grid[0]}x{task.grid[1]} "
            "(its spatial position embeddings); extract it with the training store's --input-size"
        )


TASK = TaskDef(
    "video",
    HEADS,
    VideoTask,
    check_eval_store,
    "avg/top1",
    defaults={"batch_size": 64, "lr": 3e-4, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 2.5},
    eval_views="all",  # every clip x crop, each and averaged
    shown_families=(AVERAGED,),
    metric_names=TOPK_NAMES,
    outputs=OUTPUTS,
    pictures=pictures,
    per_class=per_class,
    export=ExportDef("logits (B, K)", clip_logits),
    bench=BENCH,
)  # defaults: Table 13, frozen
