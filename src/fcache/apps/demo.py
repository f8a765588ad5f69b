"""``fcache demo``: the whole tool on an embedded dataset, on a CPU, in a few minutes.

Builds a small COCO-format detection set from real photos shipped inside scikit-image and
scikit-learn with pasted shapes (squares, discs, triangles; boxes and polygon masks exact),
extracts it once with a random-init SwinV2-T at 256, trains a BiFPN Mask R-CNN head from the
store, evaluates it with pycocotools against the untrained head, and writes a report folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

import numpy as np

from fcache.apps.config import DemoConfig
from fcache.common.outputs import OwnedFolder

CATEGORIES = ({"id": 1, "name": "square"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "triangle"})
COLORS = {1: (230, 40, 40), 2: (40, 200, 60), 3: (40, 90, 235)}
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg")


def photo_paths() -> list[Path]:
    """Real photos that ship inside scikit-image (and scikit-learn, when it is installed)."""
    import skimage.data

    sk = Path(skimage.data.__file__).parent
    paths = [sk / p for p in PHOTOS]
    try:
        import sklearn.datasets

        paths += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    except ImportError:
        pass
    return [p for p in paths if p.is_file()]


def shape_polygon(cat: int, cx: float, cy: float, r: float, angle: float) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] polygon of a square, disc (32-gon) or triangle of circumradius r."""
    sides = {1: 4, 2: 32, 3: 3}[cat]
    start = angle + (math.pi / 4 if cat == 1 else -math.pi / 2)
    pts = [(cx + r * math.cos(start + 2 * math.pi * k / sides), cy + r * math.sin(start + 2 * math.pi * k / sides)) for k in range(sides)]
    return [round(v, 2) for p in pts for v in p]


def make_image(photo: Image.Image, rng: np.random.Generator, image_id: int, long_side: int) -> tuple[Image.Image, list[dict]]:
    """A resized crop of a photo with 1-3 pasted shapes; their annotations in COCO form."""
    from PIL import Image, ImageDraw

    w, h = photo.size
    s = float(rng.uniform(0.6, 1.0))
    cw, ch = int(w * s), int(h * s)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch))
    scale = long_side / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    anns = []
    for _ in range(int(rng.integers(1, 4))):
        cat = int(rng.integers(1, 4))
        r = float(rng.uniform(0.07, 0.16)) * long_side
        cx, cy = float(rng.uniform(r, img.width - r)), float(rng.uniform(r, img.height - r))
        poly = shape_polygon(cat, cx, cy, r, float(rng.uniform(0, math.pi)))
        draw.polygon(poly, fill=COLORS[cat])
        xs, ys = poly[0::2], poly[1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
        anns.append({"image_id": image_id, "category_id": cat, "bbox": [round(v, 2) for v in bbox], "area": round(area, 2),
                     "iscrowd": 0, "segmentation": [poly]})  # fmt: skip
    return img, anns


def build_dataset(root: Path, n: int, seed: int, long_side: int = 256) -> tuple[Path, Path]:
    """root/images/*.jpg + root/annotations.json: n photos with pasted shapes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(n):
        img, a = make_image(photos[k % len(photos)], rng, k + 1, long_side)
        img.save(root / "images" / f"{k:04d}.jpg", quality=92)
        images.append({"id": k + 1, "file_name": f"{k:04d}.jpg", "width": img.width, "height": img.height})
        anns += a
    for i, ann in enumerate(anns, start=1):
        ann["id"] = i
    ann_path = root / "annotations.json"
    ann_path.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [dict(c, supercategory="shape") for c in CATEGORIES]})
    )
    return root / "images", ann_path


DEMO_ENTRIES = ("data", "train.zarr", "val.zarr", "run", "report")  # what a demo's --out folder holds
MARKER = ".fcache-demo.json"  # the demo folder's marker (common.outputs.OwnedFolder)


def demo_folder(out: Path) -> OwnedFolder:
    """The demo's folder, checked: a rerun replaces an earlier demo's (one written before the marker, without it, is
    told by its entries); a folder holding anything else is refused (nothing of yours is deleted)."""
    folder = OwnedFolder(out, "--out", MARKER, who="the demo", legacy=lambda _: DEMO_ENTRIES)
    folder.check()
    return folder


def extract_settings(cfg: DemoConfig) -> dict[str, Any]:
    """The demo's ``fcache extract`` settings besides the dataset and ``--out`` (ExtractConfig fields)."""
    return {"model": "swinv2-t", "random_init": True, "input_size": cfg.input_size, "levels": cfg.levels, "seed": cfg.seed,
            "num_workers": cfg.num_workers, "device": "cpu", "batch_size": 4, "shard_size": 8}  # fmt: skip


def train_settings(cfg: DemoConfig) -> dict[str, Any]:
    """The demo head's ``fcache train-head`` settings besides the stores and ``--out`` (TrainConfig fields)."""
    return {"head": cfg.head, "iters": cfg.iters, "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup": min(20, cfg.iters // 5),
            "schedule": "cosine", "seed": cfg.seed, "num_workers": cfg.num_workers, "device": "cpu", "checkpoint_every": cfg.iters,
            "log_every": 5, "clip": 5.0}  # fmt: skip


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Dataset -> extract -> train -> evaluate (untrained and trained) -> report. Returns metrics.json's content."""
    import torch

    from fcache.extract.config import ExtractConfig
    from fcache.extract.driver import run_extract, summary_lines
    from fcache.train_heads.config import TrainConfig
    from fcache.train_heads.data import eval_data
    from fcache.train_heads.evaluation import evaluate
    from fcache.train_heads.training import prepare_training, run_train

    out = Path(cfg.out)
    folder = demo_folder(out)
    folder.claim(DEMO_ENTRIES)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    stores = {}
    for split, n, seed in (("train", cfg.train_images, cfg.seed), ("val", cfg.val_images, cfg.seed + 1000)):
        images, ann = build_dataset(out / "data" / split, n, seed)
        say(f"[demo] {split}: {n} photos with pasted shapes in {out / 'data' / split}")
        t = time.perf_counter()
        ecfg = ExtractConfig.from_flags(dataset="coco", root=str(images), annotations=str(ann), out=str(out / f"{split}.zarr"),
                                        **extract_settings(cfg))  # fmt: skip
        summary = run_extract(ecfg, show_progress=True)
        timings[f"extract_{split}_s"] = round(time.perf_counter() - t, 1)
        stores[split] = out / f"{split}.zarr"
        say("\n".join(f"[demo]   {line}" for line in summary_lines(summary)))
    trained_cfg = TrainConfig(store=str(stores["train"]), out=str(out / "run"), val_store=str(stores["val"]), **train_settings(cfg))
    p = prepare_training(trained_cfg)  # the head as initialised: the baseline it must beat
    assert p.val is not None
    untrained = evaluate(
        p.task, p.model, eval_data(p.val, p.task, p.levels), batch_size=4, num_workers=0, device=torch.device("cpu"), progress=False
    )
    say(f"[demo] training {cfg.head} for {cfg.iters} iterations from the store (the backbone is not loaded)")
    t = time.perf_counter()
    result = run_train(trained_cfg, progress=True, say=lambda m: say(f"[demo] {m}"))
    timings["train_s"] = round(time.perf_counter() - t, 1)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    metrics = {
        "head": cfg.head,
        "iters": cfg.iters,
        "trainable_params": result["trainable_params"],
        "untrained": untrained,
        "trained": result.get("eval", {}),
        "timings": {**timings, "total_s": round(time.perf_counter() - t0, 1)},
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_losses(out / "run" / "metrics.jsonl", report / "loss.png")
    draw_predictions(out / "run" / "eval" / "val" / "detections.json", out / "data" / "val", report / "predictions.png")
    folder.record(DEMO_ENTRIES)
    return metrics


def plot_losses(metrics_jsonl: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "iter" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
        ax.plot([r["iter"] for r in rows if key in r], [r[key] for r in rows if key in r], label=key, lw=2 if key == "loss" else 1)
    ax.set(xlabel="iteration", ylabel="loss", title="training loss (from the store)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def draw_predictions(detections_json: Path, data: Path, png: Path, images: int = 6, min_score: float = 0.5, tile: int = 512) -> None:
    """Predicted boxes and masks (score >= min_score) on the first val images, in a grid, drawn by ``detection.draw`` (each
    detection in a colour far from the pixels it covers, with a legible name + score tag)."""
    from PIL import Image

    from fcache.train_heads.detection.draw import draw_detections

    coco = json.loads((data / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    dets = json.loads(detections_json.read_text()) if detections_json.exists() else []
    tiles = []
    for rec in coco["images"][:images]:
        img = np.asarray(Image.open(data / "images" / rec["file_name"]).convert("RGB"))
        mine = [d for d in dets if d["image_id"] == rec["id"] and d["score"] >= min_score]
        mine = [d | {"category_name": names.get(d["category_id"], "?")} for d in mine]
        t = Image.fromarray(draw_detections(img, mine))
        tiles.append(t.resize((tile, round(tile * t.height / t.width)), Image.Resampling.LANCZOS))
    cols = 3
    rows = math.ceil(len(tiles) / cols)
    th = max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * tile, rows * th), (20, 20, 20))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * tile, (k // cols) * th))
    grid.save(png)


def summary_lines(m: dict[str, Any], out: str) -> list[str]:
    u, t = m["untrained"], m["trained"]
    return [
        "",
        f"fcache demo: {m['head']} ({m['trainable_params']:,} trainable parameters), {m['iters']} iterations on cached features",
        f"  val box AP50: untrained {u['box/AP50']:.3f} -> trained {t['box/AP50']:.3f}"
        f"   (box AP {u['box/AP']:.3f} -> {t['box/AP']:.3f}, mask AP50 {u['mask/AP50']:.3f} -> {t['mask/AP50']:.3f})",
        f"  time: {m['timings']['total_s']:.0f} s in all (train {m['timings']['train_s']:.0f} s)",
        f"  report: {out}/report (metrics.json, loss.png, predictions.png)",
    ]
