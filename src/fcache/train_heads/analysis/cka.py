"""``fcache cka``: linear CKA across a trained head's layers (the paper's Figures 3 and 5).

Linear CKA (Kornblith et al., ICML 2019) with the minibatch-unbiased HSIC estimator of Nguyen et al.
(ICLR 2021): HSIC_1 is averaged over minibatches, so memory stays bounded however many samples are
used. Representations are taken with forward hooks, grouped like the paper's panels:
- neck, one panel per level: the stored input P_x and the output of every block (BiFPN layer, FPN,
  each residual block of fpn-res); an example is one image, its features the flattened map;
- cascade: every stage's RoI features and its two hidden fc layers, over the same RoIs (the refined
  boxes of stage s are stage s+1's RoIs one for one); an example is one RoI.
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from fcache.common.errors import InputError
from fcache.common.outputs import OwnedFolder
from fcache.train_heads.config import MIN_EXAMPLES, CkaConfig
from fcache.train_heads.necks.base import Tap


def hsic1(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Unbiased HSIC estimator (Song et al., 2012) of two (n, n) Gram matrices, n >= 4."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)  # noqa: E741
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    trace = (k * l).sum()
    sums = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
    return ((trace + sums - cross) / (n * (n - 3))).squeeze()


class MinibatchCKA:
    """Accumulates HSIC_1 between every pair of named representations over minibatches; ``matrix()`` gives CKA."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.hsic = torch.zeros(len(names), len(names), dtype=torch.float64)
        self.batches = 0

    def update(self, reps: dict[str, Tensor]) -> None:
        """reps: name -> (n, p) features of the same n examples (n >= 4)."""
        grams = []
        for name in self.names:
            x = reps[name].reshape(reps[name].shape[0], -1).double()  # (n, p)
            grams.append(x @ x.T)  # (n, n), linear kernel
        for i in range(len(grams)):
            for j in range(i, len(grams)):
                v = hsic1(grams[i], grams[j])
                self.hsic[i, j] += v
                self.hsic[j, i] = self.hsic[i, j]
        self.batches += 1

    def matrix(self) -> Tensor:
        d = self.hsic.diagonal().clamp_min(1e-30).sqrt()
        return self.hsic / (d[:, None] * d[None, :])


def cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two (n, p) representations of the same n examples, in one minibatch."""
    m = MinibatchCKA(["x", "y"])
    m.update({"x": x, "y": y})
    return float(m.matrix()[0, 1])


@dataclass
class Taps:
    """Representations captured during one forward: group -> label -> (n, ...) tensor."""

    groups: dict[str, OrderedDict[str, Tensor]]


@contextmanager
def tapped(model: nn.Module, rois_per_batch: int = 256, seed: int = 0) -> Iterator[Callable[[], Taps]]:
    """Hooks the neck (and cascade stages) of a detector; yields a function returning the last forward's taps."""
    groups: dict[str, OrderedDict[str, Tensor]] = defaultdict(OrderedDict)
    handles = []
    neck = getattr(model, "neck", None)
    if neck is not None:
        handles += _neck_hooks(neck, groups)
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and hasattr(roi_heads, "stages"):
        handles += _cascade_hooks(roi_heads, groups)
    gen = torch.Generator().manual_seed(seed)

    def taps() -> Taps:
        out = {g: OrderedDict((k, v) for k, v in reps.items()) for g, reps in groups.items()}
        if "cascade" in out:  # same RoIs in every stage: subsample them once, consistently
            n = min(v.shape[0] for v in out["cascade"].values())
            keep = torch.randperm(n, generator=gen)[:rois_per_batch]
            out["cascade"] = OrderedDict((k, v[:n][keep]) for k, v in out["cascade"].items())
        groups.clear()
        return Taps(out)

    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def _neck_hooks(neck: nn.Module, groups: dict[str, OrderedDict[str, Tensor]]) -> list[Any]:
    """The stored inputs P_x (a pre-hook on the neck) and the outputs of every block the neck declares (``Neck.taps``)."""
    in_names = [lv.name for lv in cast(Any, neck).in_levels]
    try:
        taps = cast(Any, neck).taps()
    except NotImplementedError as e:
        raise InputError(f"{e}; fcache cka cannot analyse this head") from None

    def inputs(_m: nn.Module, args: tuple[Any, ...]) -> None:
        for name in in_names:
            groups[name][f"{name.upper()} in"] = args[0][name].detach().float().cpu()

    handles = [neck.register_forward_pre_hook(inputs)]
    for tap in taps:

        def out_hook(_m: nn.Module, _a: Any, out: Any, tap: Tap = tap) -> None:
            for name, x in tap.levels(out).items():
                groups[name][tap.label] = x.detach().float().cpu()

        handles.append(tap.module.register_forward_hook(out_hook))
    return handles


def _cascade_hooks(roi_heads: nn.Module, groups: dict[str, OrderedDict[str, Tensor]]) -> list[Any]:
    """Each stage's RoI features (the input of its own box head: the RoIAlign module is shared) and its fc6, fc7."""
    handles = []
    for s, stage in enumerate(cast(Any, roi_heads).stages, start=1):

        def roi(_m: nn.Module, args: tuple[Any, ...], key: str = f"s{s} RoI") -> None:
            groups["cascade"][key] = args[0].detach().float().flatten(1).cpu()  # (R, C * 7 * 7)

        handles.append(stage.box_head.register_forward_pre_hook(roi))
        for label in ("fc6", "fc7"):

            def hook(_m: nn.Module, _a: Any, out: Tensor, key: str = f"s{s} {label}") -> None:
                groups["cascade"][key] = out.detach().float().flatten(1).cpu()  # (R, 1024), before the ReLU

            handles.append(getattr(stage.box_head, label).register_forward_hook(hook))
    return handles


def analyse(batches: Iterator[Taps]) -> dict[str, dict[str, Any]]:
    """CKA matrix per group over all batches (groups whose batches are too small are skipped)."""
    acc: dict[str, MinibatchCKA] = {}
    for taps in batches:
        for group, reps in taps.groups.items():
            if not reps or min(v.shape[0] for v in reps.values()) < MIN_EXAMPLES:
                continue
            acc.setdefault(group, MinibatchCKA(list(reps)))
            acc[group].update(reps)
    return {g: {"labels": m.names, "cka": m.matrix().tolist(), "minibatches": m.batches} for g, m in acc.items()}


def heatmap(result: dict[str, dict[str, Any]], png: Path, title: str) -> None:
    """One labelled heatmap panel per group, values written in the cells (like the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(result)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 0.6, 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        labels, m = result[g]["labels"], torch.tensor(result[g]["cka"])
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(g, fontsize=9)
        if len(labels) <= 12:
            for i in range(len(labels)):
                for j in range(len(labels)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if m[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="linear CKA")
    fig.suptitle(title, fontsize=10)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)


CKA_JSON, CKA_PNG = "cka.json", "cka.png"
MARKER = ".fcache-cka.json"  # the output folder's marker (common.outputs.OwnedFolder)


def out_folder(out: Path, flag: str) -> OwnedFolder:
    """``fcache cka``'s output folder: new, empty or an earlier cka's (one written before the marker, without it,
    holds its two files), whose files a rerun replaces."""
    return OwnedFolder(out, flag, MARKER, who="fcache cka", legacy=lambda _: (CKA_JSON, CKA_PNG))


def write(result: dict[str, dict[str, Any]], folder: OwnedFolder, title: str) -> None:
    folder.claim([CKA_JSON, CKA_PNG])
    (folder.path / CKA_JSON).write_text(json.dumps(result, indent=1))
    heatmap(result, folder.path / CKA_PNG, title)
    folder.record([CKA_JSON, CKA_PNG])


def run_cka(cfg: CkaConfig, progress: bool = True) -> dict[str, Any]:
    """CKA heatmaps of RUN's head on up to ``cfg.samples`` samples of ``cfg.store``; writes cka.json + cka.png."""
    import numpy as np
    from tqdm import tqdm

    from fcache.common.devices import resolve_device
    from fcache.train_heads.data import Collate, InOrder, eval_data
    from fcache.train_heads.evaluation import load_trained
    from fcache.train_heads.tasks import task_def

    folder = out_folder(Path(cfg.out or Path(cfg.run) / "cka"), "--out" if cfg.out else "RUN/cka")
    folder.check()
    t = load_trained(cfg.run, cfg.store, cfg.open_kwargs())
    task, model, store = t.task, t.model, t.store
    data = eval_data(store, task, t.levels, task_def(task.name).eval_views)
    rng = np.random.default_rng(cfg.seed)
    n = len(data)  # type: ignore[arg-type]
    chosen = np.sort(rng.choice(n, size=min(cfg.samples, n), replace=False))
    full = len(chosen) - len(chosen) % cfg.batch_size  # whole minibatches only
    subset = InOrder(data, cfg.batch_size, indices=chosen[:full].tolist())  # read ahead from a store in object storage
    loader = torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, collate_fn=Collate(task, with_targets=False))
    device = torch.device(resolve_device(cfg.device))
    model.to(device).eval()

    def batches() -> Iterator[Taps]:
        with tapped(model, seed=cfg.seed) as taps, torch.inference_mode():
            for batch in tqdm(loader, desc="cka", unit="batch", disable=not progress):
                task.predict(model, batch.to(device))
                yield taps()

    try:
        result = analyse(batches())
    finally:
        subset.close()
    if not result:
        raise InputError(f"{cfg.run}: nothing to analyse (the head has no neck or cascade to tap, or too few samples)")
    write(result, folder, f"linear CKA, {t.task.head} at iteration {t.iteration}, {full} samples of {Path(str(store.root)).name}")
    return {"out": str(folder.path), "samples": full, "groups": result}
