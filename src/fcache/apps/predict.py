"""``fcache predict RUN INPUT... --out DIR``: a trained head with its frozen backbone on new images or videos.

INPUTs are image or video files, folders (searched recursively, sorted) and globs; or one feature store (a folder or
an ``s3://`` / ``gs://`` URL), whose cached features are scored without any backbone (the cache path, with the ground
truth drawn beside the predictions when the store has targets and its source is still on disk). Images go through
``apps.model.TrainedModel`` (the online path, equal to ``fcache eval`` on a store of the same images). Each task writes
its files into DIR (``TaskDef.outputs``):

- detection: ``predictions.json`` (COCO results: image id, file name, category id and name, bbox xywh in original
  pixels, score, RLE mask; scores of at least ``--score-thr``);
- segmentation: ``labels/<name>.png``, the label map at original resolution (indexed PNG, the class palette);
- depth: ``depth/<name>.png``, the depth map at original resolution (16-bit PNG, millimetres);
- video, classification: ``predictions.jsonl``, one line per input: ``fcache eval``'s record (top-5 of the views' mean
  scores; a store's label) and the ``--top-k`` classes with names and scores;
- with ``--draw``: ``overlays/<name>.png`` (boxes and masks, the label map with a legend, or the depth map in colour;
  ground truth beside for a store with targets);
- ``errors.jsonl``, when an input could not be used: one line per such input (skipped, or stopped at with
  ``--on-error fail``);
- ``predict.json``: what the run wrote (``common.outputs.OwnedFolder``'s marker) and its summary.

``<name>`` is the input's name (``common.outputs.output_names``). DIR is new, empty, or an earlier predict's, whose
files a rerun replaces; nothing is written into RUN, into an input's folder or into a folder of the user's.
"""

from __future__ import annotations

import glob
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcache.apps.config import PredictConfig
from fcache.common.errors import InputError, SampleFailed
from fcache.common.outputs import OwnedFolder, check_outside, inside, output_names
from fcache.extract.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, SampleError
from fcache.store.backends import is_url
from fcache.train_heads.task import NamedInput

OVERLAYS = "overlays"
ERRORS = "errors.jsonl"
MARKER = "predict.json"
RUN_FOLDER = "the RUN folder"


def is_store(path: str | Path) -> bool:
    """A store URL (no other input is one), or a local fcache store folder."""
    if is_url(str(path)):
        return True
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


def input_folders(args: Sequence[str]) -> list[str]:
    """The folders whose every file may be an input: folders given (searched recursively), and the fixed part of a
    recursive glob (``photos/**/*.jpg``: ``photos``)."""
    folders = []
    for a in args:
        if Path(a).is_dir():
            folders.append(a)
        elif "**" in a and not Path(a).exists():
            parts = Path(a).parts
            fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            folders.append(str(Path(*parts[:fixed])) if fixed else ".")
    return folders


def check_outputs(cfg: PredictConfig, files: Sequence[str] = ()) -> OwnedFolder:
    """``--out``'s folder, checked before anything is done: outside the RUN and the inputs' folders, holding none of
    ``files`` (a rerun would predict its own outputs), and new, empty or an earlier predict's."""
    local = [a for a in cfg.inputs if not is_url(a)]
    check_outside(cfg.out, "--out", [(cfg.run, RUN_FOLDER), *((f, "the input folder") for f in input_folders(local))])
    held = next((f for f in files if inside(f, cfg.out)), None)
    if held is not None:
        raise InputError(f"--out {cfg.out} holds the input {held}; give a folder apart from the inputs (a rerun would read its outputs)")
    folder = OwnedFolder(cfg.out, "--out", MARKER)
    folder.check()
    return folder


def run_predict(cfg: PredictConfig, *, progress: bool = True) -> dict[str, Any]:
    """Predict every input of ``cfg`` and write the task's files into ``cfg.out``; returns a summary.

    Raises:
        SampleFailed: ``--on-error fail`` and an input could not be used (the predictions before it are written).
    """
    stores = [a for a in cfg.inputs if is_store(a)]
    if stores:
        if len(stores) > 1:
            raise InputError(f"fcache predict reads one store at a time (got {len(stores)}: {', '.join(stores)}); run it once per store")
        if len(cfg.inputs) > 1:
            raise InputError(f"{stores[0]} is a feature store: predict it alone, or give images and videos without it")
        return _from_store(cfg, check_outputs(cfg), progress)
    if cfg.storage_options or cfg.cache_dir or cfg.cache_size:
        raise InputError("--storage-options, --cache-dir and --cache-size are for a store in object storage as the input; drop them")
    from fcache.train_heads.runfolder import RunDir
    from fcache.train_heads.tasks import task_def

    record = RunDir(cfg.run).require_config()
    task_def(record.config.task)  # a run of a task this fcache does not know is named as such first
    video = record.require_features().preprocessing.frames is not None
    files = expand_inputs(cfg.inputs, video)
    stems = output_names([name for _, name in files])
    ids = _image_ids(cfg.annotations)
    folder = check_outputs(cfg, [path for path, _ in files])
    from fcache.apps.model import TrainedModel

    model = TrainedModel.from_run(
        cfg.run, weights=cfg.weights, random_init=cfg.random_init, device=cfg.device, test_views=cfg.test_views, clips=cfg.clips,
        crops=cfg.crops, batch_size=cfg.batch_size, score_thr=cfg.score_thr, top_k=cfg.top_k, attention=cfg.attention,
    )  # fmt: skip
    return _predict_files(cfg, model, files, stems, ids, Writer(cfg, model.task, model.manifest.view_names, folder), progress)


def _predict_files(cfg: PredictConfig, model: Any, files: list[tuple[str, str]], stems: list[str], ids: dict[str, int] | None,
                   writer: Writer, progress: bool) -> dict[str, Any]:  # fmt: skip
    """The online path: every input through the model, an input that cannot be used recorded (and, with
    ``--on-error fail``, the last one read)."""
    from tqdm import tqdm

    items = {path: NamedInput(name, path, stem) for (path, name), stem in zip(files, stems, strict=True)}

    def skip(index: int, path: str, error: SampleError) -> bool:
        writer.skip(items[path], index, error)
        bar.update()
        return cfg.on_error == "skip"

    with tqdm(total=len(files), desc=f"predict {model.task.name}", unit="input", file=sys.stderr, disable=not progress) as bar:
        for sample, prediction in model.run(list(items), image_ids=ids, on_error=skip):
            writer.add(items[sample.name], sample.image, prediction, None)
            bar.update()
    summary = writer.finish(len(files))
    if cfg.on_error == "fail" and writer.failures:
        stop = writer.failures[-1]
        raise SampleFailed(f"{stop['message']} (--on-error fail); the {summary['predicted']} input(s) before it are predicted in {cfg.out}")
    return summary


def summary_line(s: dict[str, Any]) -> str:
    """What ``fcache predict`` prints: how many inputs were predicted, what was skipped and why, the files written."""
    line = f"{s['task']}: {s['predicted']} of {s['inputs']} input(s) predicted -> {', '.join(s['files'])}"
    if s["skipped"]:
        why = ", ".join(f"{status} {n}" for status, n in s["status_counts"].items() if status != "ok")
        line += f"; {s['skipped']} skipped ({why}): see {Path(s['out']) / ERRORS}"
    return line


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
    """Writes one run's prediction files (its task's, ``TaskDef.outputs.files``), drawings and errors as samples arrive,
    into the output folder it claims (an earlier predict's files there are removed first)."""

    def __init__(self, cfg: PredictConfig, task: Any, view_names: Sequence[str], folder: OwnedFolder) -> None:
        from fcache.train_heads.task import OutputOptions
        from fcache.train_heads.tasks import task_def

        self.cfg, self.task, self.outputs, self.folder = cfg, task, task_def(task.name).outputs, folder
        self.options = OutputOptions(score_thr=cfg.score_thr, top_k=cfg.top_k)
        self.out = Path(cfg.out)
        self.files = self.outputs.files(task, self.out, self.options, view_names)
        self.entries = (*self.files.entries, OVERLAYS, ERRORS)
        self.failures: list[dict[str, Any]] = []
        self.predicted = 0
        folder.claim(self.entries, run=cfg.run, task=task.name)

    def add(self, item: NamedInput, image: np.ndarray | None, prediction: Any, truth: Any) -> None:
        """One input's prediction (``task.predict``'s), its pixels (None: nothing to draw on) and, from a store, its
        ground truth (or None)."""
        from fcache.train_heads.drawing import save_png

        self.files.add(item, prediction)
        self.predicted += 1
        if self.cfg.draw and image is not None:
            picture = self.outputs.draw(self.task, image, prediction, truth, self.options)
            if picture is not None:
                (self.out / OVERLAYS).mkdir(exist_ok=True)
                save_png(picture, self.out / OVERLAYS / f"{item.stem}.png")

    def skip(self, item: NamedInput, index: int, error: SampleError) -> None:
        """An input that could not be used (a ``SampleError``): its line in ``errors.jsonl``."""
        self.failures.append({"key": item.key, "index": index, "file": item.file, "status": error.status.label, "message": error.message})

    def finish(self, n: int) -> dict[str, Any]:
        from fcache.common.files import atomic_file

        if self.failures:
            with atomic_file(self.out / ERRORS) as tmp:
                tmp.write_text("".join(json.dumps(f, sort_keys=True) + "\n" for f in self.failures))
        summary = self.files.finish()
        written = [self.out / OVERLAYS, self.out / ERRORS]
        files = [*summary.pop("files"), *(str(p) for p in written if p.exists())]
        counts = Counter({"ok": self.predicted}) + Counter(f["status"] for f in self.failures)
        result = {"run": self.cfg.run, "task": self.task.name, "inputs": n, "predicted": self.predicted, "skipped": len(self.failures),
                  "status_counts": dict(sorted(counts.items())), "exit_code": 3 if self.failures else 0, "out": str(self.out),
                  "files": files} | summary  # fmt: skip
        self.folder.record(self.entries, **result)
        return result


def _from_store(cfg: PredictConfig, folder: OwnedFolder, progress: bool) -> dict[str, Any]:
    """The cache path: the run's head on a store's features, as ``fcache eval`` reads them (no backbone)."""
    import torch

    from fcache.common.devices import resolve_device
    from fcache.train_heads.data import eval_data
    from fcache.train_heads.evaluation import load_trained, predict_all
    from fcache.train_heads.tasks import task_def

    if cfg.test_views or cfg.clips or cfg.crops or cfg.weights or cfg.random_init:
        raise InputError("a store brings its own features and views: drop --test-views, --clips, --crops, --weights and --random-init")
    t = load_trained(cfg.run, cfg.inputs[0], cfg.open_kwargs())
    tdef = task_def(t.task.name)
    data = eval_data(t.store, t.task, t.levels, tdef.eval_views)
    device = torch.device(resolve_device(cfg.device))
    indices = [int(i) for i in t.store.ok_indices]
    keys = [str(t.store.keys[i]) for i in indices]
    stems = output_names(keys, "samples")
    raw, predictions = predict_all(t.task, t.model, data, batch_size=cfg.batch_size, num_workers=0, device=device, progress=progress)
    writer = Writer(cfg, t.task, t.store.manifest.view_names, folder)
    pictures = _store_images(t.store, indices) if cfg.draw else iter(())
    for i, key, stem, r, p in zip(indices, keys, stems, raw, predictions, strict=True):
        image = next(pictures, None) if cfg.draw else None
        truth = tdef.outputs.truth(t.store, i, r) if image is not None else None
        writer.add(NamedInput(key, key, stem, r), image, p, truth)
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
