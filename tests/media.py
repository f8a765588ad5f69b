"""Real photos shipped inside scikit-image / scikit-learn, written as small dataset folders for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

SKIMAGE = Path(skimage.data.__file__).parent
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "ihc.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
)


def photo(k: int, long_side: int = 160) -> Image.Image:
    img = Image.open(SKIMAGE / PHOTOS[k % len(PHOTOS)]).convert("RGB")
    scale = long_side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)


def image_folder(root: Path, n: int = 6, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    """ImageFolder layout: root/<class>/<k>.jpg, n photos spread over the classes."""
    for k in range(n):
        d = root / classes[k % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        photo(k).save(d / f"img{k}.jpg", quality=92)
    return root


def coco_dataset(root: Path, n: int = 5) -> tuple[Path, Path]:
    """root/images/*.jpg + root/annotations.json with one box + polygon per image (the last has none)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(n):
        img = photo(k)
        img.save(images_dir / f"{k:03d}.jpg", quality=92)
        images.append({"id": 100 + k, "file_name": f"{k:03d}.jpg", "width": img.width, "height": img.height})
        if k == n - 1:
            continue
        x, y, w, h = 10.0 + k, 12.0, 40.0, 30.0
        anns.append(
            {
                "id": 1000 + k,
                "image_id": 100 + k,
                "category_id": 1 + k % 2,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
        )
    cats = [{"id": 1, "name": "square", "supercategory": "shape"}, {"id": 2, "name": "disc", "supercategory": "shape"}]
    ann_path = root / "annotations.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return images_dir, ann_path


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
