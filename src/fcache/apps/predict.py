"""``fcache predict RUN INPUT... --out DIR``: a trained head with its frozen backbone on new images or videos.

INPUTs are image or video files, folders (searched recursively, sorted) and globs; or one feature store, whose cached
features are scored without any backbone (the cache path, with the ground truth drawn beside the predictions when
the store has targets and its source is still on disk). Images go through ``apps.model.TrainedModel`` (the online
path, equal to ``fcache eval`` on a store of the same images). Each task writes its files into DIR
(``TaskDef.outputs``):

- detection: ``predictions.json`` (COCO results: image id, file name, category id and name, bbox xywh in original
  pixels, score, RLE mask; scores of at least ``--score-thr``);
- segmentation: ``labels/<name>.png``, the label map at original resolution (indexed PNG, the class palette);
- depth: ``depth/<name>.png``, the depth map at original resolution (16-bit PNG, millimetres);
- video, classification: ``predictions.jsonl``, one line per input: ``fcache eval``'s record (top-5 of the views' mean
  scores) and the ``--top-k`` classes with names and scores;
- with ``--draw``: ``overlays/<name>.png`` (boxes and masks, the label map with a legend, or the depth map in colour;
  ground truth beside for a store with targets).

Nothing is written into RUN.
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcache.apps.config import PredictConfig
from fcache.common.errors import InputError
from fcache.extract.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

OVERLAYS = "overlays"


def is_store(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "zarr.json").is_file() and '"fcache"' in (p / "zarr.json").read_text()


def expand_inputs(args: tuple[str, ...], video: bool) -> list[tuple[str, str]]:
    """(path, name) of every input file: files as given, folders searched recursively, globs expanded, sorted; the name
    (what output files are called) is the path relative to its folder, or the file name."""
    suffixes = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    found: list[tuple[str, str]] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            found += [(str(f), str(f.relative_to(p))) for f in files]
        elif p.is_file():
            found.append((a, p.name))
        elif glob.has_magic(a):
            found += [(f, Path(f).name) for f in sorted(glob.glob(a, recursive=True)) if Path(f).is_file()]
        else:
            raise InputError(f"{a}: no such file, folder or glob match")
    if not found:
        kind = "video" if video else "image"
        raise InputError(f"no {kind} files in {', '.join(args)} (looked for {', '.join(suffixes)})")
    names = [n for _, n in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"two inputs are both called {twice[0]}; give them from one folder, or rename one")
    return found


def run_predict(cfg: PredictConfig, *, progress: bool = True) -> dict[str, Any]:
    """Predict every input of ``cfg`` and write the task's files into ``cfg.out``; returns a summary."""
    from fcache.common.files import check_writable

    check_writable(cfg.out, "--out")
    if len(cfg.inputs) == 1 and is_store(cfg.inputs[0]):
        return _from_store(cfg, progress)
    from tqdm import tqdm

    from fcache.apps.model import TrainedModel

    model = TrainedModel.from_run(
        cfg.run, weights=cfg.weights, random_init=cfg.random_init, device=cfg.device, test_views=cfg.test_views, clips=cfg.clips,
        crops=cfg.crops, batch_size=cfg.batch_size, score_thr=cfg.score_thr, top_k=cfg.top_k,
    )  # fmt: skip
    files = expand_inputs(cfg.inputs, model.video)
    names = {path: name for path, name in files}
    ids = _image_ids(cfg.annotations)
    writer = Writer(cfg, model.task, model.manifest.view_names)
    bar = tqdm(total=len(files), desc=f"predict {model.task.name}", unit="input", file=sys.stderr, disable=not progress)
    for sample, prediction in model.run((path for path, _ in files), image_ids=ids):
        writer.add(names[sample.name], sample.name, sample.image, prediction, None)
        bar.update()
    bar.close()
    return writer.finish(len(files))


def _image_ids(annotations: str) -> dict[str, int] | None:
    """File name -> image id of a COCO json (``--annotations``), so predictions carry the dataset's ids."""
    if not annotations:
        return None
    try:
        images = json.loads(Path(annotations).read_text())["images"]
        return {Path(im["file_name"]).name: int(im["id"]) for im in images}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--annotations {annotations}: not a readable COCO json with images ({e})") from None


class Writer:
    """Writes one run's prediction files (its task's, ``TaskDef.outputs.files``) and drawings as samples arrive."""

    def __init__(self, cfg: PredictConfig, task: Any, view_names: Sequence[str]) -> None:
        from fcache.train_heads.task import OutputOptions
        from fcache.train_heads.tasks import task_def

        self.cfg, self.task, self.outputs = cfg, task, task_def(task.name).outputs
        self.options = OutputOptions(score_thr=cfg.score_thr, top_k=cfg.top_k)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.files = self.outputs.files(task, self.out, self.options, view_names)
        if cfg.draw:
            (self.out / OVERLAYS).mkdir(exist_ok=True)

    def add(self, name: str, file: str, image: np.ndarray | None, prediction: Any, truth: Any) -> None:
        """One input's prediction (``task.predict``'s), its pixels (None: nothing to draw on) and, from a store, its
        ground truth (or None)."""
        from fcache.train_heads.drawing import save_png
        from fcache.train_heads.segmentation.labelmaps import file_name

        self.files.add(name, file, prediction)
        if self.cfg.draw and image is not None:
            picture = self.outputs.draw(self.task, image, prediction, truth, self.options)
            if picture is not None:
                save_png(picture, self.out / OVERLAYS / f"{file_name(name)}.png")

    def finish(self, n: int) -> dict[str, Any]:
        summary = self.files.finish()
        files = list(summary.pop("files")) + ([str(self.out / OVERLAYS)] if self.cfg.draw else [])
        return {"run": self.cfg.run, "task": self.task.name, "inputs": n, "out": str(self.out), "files": files} | summary


def _from_store(cfg: PredictConfig, progress: bool) -> dict[str, Any]:
    """The cache path: the run's head on a store's features, as ``fcache eval`` reads them (no backbone)."""
    import torch

    from fcache.common.devices import resolve_device
    from fcache.train_heads.data import eval_data
    from fcache.train_heads.evaluation import load_trained, predict_all
    from fcache.train_heads.tasks import task_def

    if cfg.test_views or cfg.clips or cfg.crops or cfg.weights or cfg.random_init:
        raise InputError("a store brings its own features and views: drop --test-views, --clips, --crops, --weights and --random-init")
    t = load_trained(cfg.run, cfg.inputs[0])
    tdef = task_def(t.task.name)
    data = eval_data(t.store, t.task, t.levels, tdef.eval_views)
    device = torch.device(resolve_device(cfg.device))
    raw, predictions = predict_all(t.task, t.model, data, batch_size=cfg.batch_size, num_workers=0, device=device, progress=progress)
    writer = Writer(cfg, t.task, t.store.manifest.view_names)
    indices = [int(i) for i in t.store.ok_indices]
    pictures = _store_images(t.store, indices) if cfg.draw else iter(())
    for i, r, p in zip(indices, raw, predictions, strict=True):
        key = str(t.store.keys[i])
        image = next(pictures, None) if cfg.draw else None
        truth = tdef.outputs.truth(t.store, i, r) if image is not None else None
        writer.add(key, key, image, p, truth)
    return writer.finish(len(indices))


def _store_images(store: Any, indices: list[int]) -> Iterator[np.ndarray | None]:
    """The original pixels of the store's samples, decoded from its recorded source (None when it is not on disk)."""
    from fcache.extract.sources import build_source

    try:
        source = build_source(store.manifest.dataset.source)
        refs = {r.key: r for r in source.samples()}
    except Exception:  # the source is gone or moved: draw nothing rather than fail the predictions
        refs = {}
    for i in indices:
        ref = refs.get(str(store.keys[i]))
        if ref is None:
            yield None
            continue
        d = source.decode(ref)
        yield d.image if d.image is not None else (d.frames[0] if d.frames is not None else None)
