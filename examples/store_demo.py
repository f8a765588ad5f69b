"""What `make demo` runs until extraction and head training exist: the feature store on its own.

Runs a random-init SwinV2-T over four photos shipped inside scikit-image, commits the features into
a store unit by unit, then shows `fcache info`, `fcache verify` and a read back through the Dataset.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import skimage.data
import timm
import torch
from PIL import Image

from fcache import store as fstore
from fcache.spec import BackboneInfo, DatasetInfo, Geometry, LevelSpec, Manifest, Preprocessing, StorageSpec, keys_digest, level_name

OUT = Path("demo-output/store.zarr")
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]
SIZE = 128


def main() -> None:
    print("fcache demo (store only: extract and train-head are not built yet)")
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, features_only=True, img_size=SIZE).eval()
    levels = tuple(
        LevelSpec(level_name(r), c, r) for c, r in zip(model.feature_info.channels(), model.feature_info.reduction(), strict=True)
    )
    m = Manifest(
        BackboneInfo("swinv2-t", "swinv2_tiny_window8_256", "random-init", SIZE, 8, levels),
        Preprocessing(),
        StorageSpec(dtype="fp16", codec="zstd", shard_size=2),
        DatasetInfo("folder", len(PHOTOS), keys_digest(PHOTOS), root="skimage/data"),
    )
    shutil.rmtree(OUT, ignore_errors=True)
    writer = fstore.create(OUT, m, PHOTOS)
    root = Path(skimage.data.__file__).parent
    for unit in writer.pending():
        feats: dict[str, list[np.ndarray]] = {lv.name: [] for lv in levels}
        geometry = []
        for name in PHOTOS[unit.start : unit.stop]:
            img = Image.open(root / name).convert("RGB")
            w, h = img.size
            scale = SIZE / max(w, h)
            canvas = np.zeros((SIZE, SIZE, 3), np.float32)
            resized = np.asarray(img.resize((round(w * scale), round(h * scale))), np.float32) / 255
            canvas[: resized.shape[0], : resized.shape[1]] = (resized - m.preprocessing.mean) / m.preprocessing.std
            with torch.inference_mode():
                out = model(torch.from_numpy(canvas).permute(2, 0, 1)[None])
            for lv, f in zip(levels, out, strict=True):
                feats[lv.name].append(f.permute(0, 3, 1, 2).numpy())  # NHWC -> NCHW, (1, C, H, W) = one view
            g = Geometry(orig_h=h, orig_w=w, scale=scale, valid_w=resized.shape[1], valid_h=resized.shape[0], canvas=SIZE)
            geometry.append(g.to_array()[None])
        writer.write_unit(unit, {k: np.stack(v) for k, v in feats.items()}, np.ones(len(unit), np.uint8), np.stack(geometry))
    writer.finalize()
    for cmd in (["info", str(OUT)], ["verify", str(OUT)]):
        print(f"\n$ fcache {' '.join(cmd)}", flush=True)
        subprocess.run([sys.executable, "-m", "fcache", *cmd], check=True)
    item = fstore.open(OUT).dataset(["p3"])[1]
    print(f"\nread back: sample {item['index']} p3 {tuple(item['features']['p3'].shape)} {item['features']['p3'].dtype}")
    print(f"store written to {OUT}")


if __name__ == "__main__":
    main()
