"""The paper's SwinV2-G (~3.0B parameters), built on timm's port of the official SwinV2 code plus the extra norms.

Configuration (SwinV2 paper, Liu et al. 2022, "SwinV2-G"): embed dim 512, depths (2, 2, 42, 4),
heads (16, 32, 64, 128), and "an additional layer normalization on the main branch every 6 layers" (counted per stage,
as timm's ``swinv2_cr`` does: blocks 6, 12, ..., 42 of stage 3, keys ``layers.2.blocks.{5,11,...,41}.norm3.*``).

Why timm's ``SwinTransformerV2`` (the official port) and not ``swinv2_cr``, whose ``swinv2_cr_giant_*`` with
``depths=(2, 2, 42, 4)`` also comes to 3.0B (2,997,525,696 parameters without the classifier; 2,997,843,680 here):
the official layout of checkpoints (downsample at the end of a stage, q/v biases, ``cpb_mlp``), its conversion
(``checkpoint_filter_fn``) and ``pretrained_window_sizes`` then share one code path with SwinV2-T/S/B/L. The
two differ in the attention bias MLP, the qkv bias and the patch merging, so official weights load into this one
only. timm's own 2.6B giant (depths (2, 2, 42, 2)) stays available as ``swinv2-g-timm``.

Window (the paper's appendix, "Swin-G setting"): 32 for COCO at 1024, 40 for ADE20K at 640, 16 for
Kinetics-400; ``WINDOWS`` keys them by task, and other tasks take ``DEFAULT_WINDOW``.
Importing this module imports no torch (``fcache plan`` reads its configuration); building does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from timm.models.swin_transformer_v2 import SwinTransformerV2

CONFIG: dict[str, Any] = {"embed_dim": 512, "depths": (2, 2, 42, 4), "num_heads": (16, 32, 64, 128)}
EXTRA_NORM_EVERY = 6
WINDOWS = {"detection": 32, "segmentation": 40, "video": 16}
DEFAULT_WINDOW = 32
DESCRIPTION = "timm SwinTransformerV2, embed 512, depths 2-2-42-4, heads 16-32-64-128, extra LN every 6 blocks"


def build_swinv2_giant(input_size: int, window: int) -> SwinTransformerV2:
    """SwinV2-G without a classifier (``num_classes=0``), on the current default device; maps of any multiple of 32."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    model = SwinTransformerV2(img_size=input_size, window_size=window, num_classes=0, strict_img_size=False, **CONFIG)
    return add_extra_norms(model, EXTRA_NORM_EVERY)


def add_extra_norms(model: SwinTransformerV2, every: int) -> SwinTransformerV2:
    """A LayerNorm ``norm3`` after every ``every``-th block of each stage, applied to the block's output."""
    from torch import nn

    for stage in cast(nn.ModuleList, model.layers):
        for i, block in enumerate(cast(nn.Sequential, stage.blocks)):
            if (i + 1) % every == 0:
                norm1 = cast(nn.LayerNorm, block.norm1)
                block.norm3 = nn.LayerNorm(norm1.normalized_shape, eps=norm1.eps, device=norm1.weight.device)
                block.register_forward_hook(_apply_norm3)
    return model


def _apply_norm3(block: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return cast("torch.nn.LayerNorm", block.norm3)(output)  # (B, H, W, C): the main branch after both residual adds
