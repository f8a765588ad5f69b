"""Store I/O: write MB/s, read MB/s through the torch Dataset (0 and 2 workers), bytes per sample, ratio.

Features shaped like SwinV2-B at 512 (p2..p5: 128/256/512/1024 channels at strides 4..32), computed
by a random-init swinv2_base_window8_256 run at 512 on real photos. MB are the stored dtype's
uncompressed bytes. Usage: python benchmarks/store_io.py [--samples 16] [--size 512]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photos, save, table  # noqa: E402
from fcache import store as fstore  # noqa: E402
from fcache.spec import (  # noqa: E402
    GEOMETRY_FIELDS,
    BackboneInfo,
    DatasetInfo,
    LevelSpec,
    Manifest,
    Preprocessing,
    SourceConfig,
    StorageSpec,
    keys_digest,
)
from fcache.store.dtypes import DTYPES  # noqa: E402


def backbone_features(n: int, size: int) -> list[dict[str, np.ndarray]]:
    import timm
    import torch.nn.functional as F

    model = timm.create_model("swinv2_base_window8_256", pretrained=False, features_only=True, img_size=size).eval()
    names = [f"p{int(np.log2(r))}" for r in model.feature_info.reduction()]
    out = []
    for img in photos(n):
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        with torch.inference_mode():
            feats = model((x - 0.45) / 0.225)
        out.append({nm: f.permute(0, 3, 1, 2).numpy()[0] for nm, f in zip(names, feats, strict=True)})
    return out


def run(dtype: str, feats: list[dict[str, np.ndarray]], shard: int, size: int, root: Path) -> dict:
    n = len(feats)
    levels = tuple(LevelSpec(name, x.shape[0], size // x.shape[-1]) for name, x in feats[0].items())
    keys = [f"s{i}" for i in range(n)]
    m = Manifest(
        BackboneInfo("swinv2-b", "swinv2_base_window8_256", "random-init", size, 8, levels),
        Preprocessing(),
        StorageSpec(dtype=dtype, codec="zstd", shard_size=shard),
        DatasetInfo(SourceConfig("bench", ""), n, keys_digest(keys)),
    )
    path = root / f"{dtype}.zarr"
    w = fstore.create(path, m, keys)
    payloads = []
    for u in w.units:
        fe = {lv.name: np.stack([feats[i][lv.name][None] for i in range(u.start, u.stop)]) for lv in levels}
        payloads.append((u, fe, np.ones(len(u), np.uint8), np.zeros((len(u), 1, len(GEOMETRY_FIELDS)), np.float32)))
    stored_per_sample = sum(x.size for x in feats[0].values()) * DTYPES[dtype].numpy.itemsize
    t = time.perf_counter()
    for u, fe, st, ge in payloads:
        w.write_unit(u, fe, st, ge)
    write_s = time.perf_counter() - t
    w.finalize()
    info = fstore.describe(path)
    row = {
        "dtype": dtype,
        "write_MB_s": stored_per_sample * n / write_s / 1e6,
        "ratio": info["compression_ratio"],
        "MB_per_sample": info["disk_bytes"] / n / 1e6,
        **{f"{lv['name']}_KB": lv["bytes_per_sample"] / 1e3 for lv in info["levels"]},
        "rel_rmse": max(info["manifest"]["quantisation_error"].values()),
    }
    for workers in (0, 2):
        ds = fstore.open(path).dataset()
        loader = torch.utils.data.DataLoader(
            ds, batch_size=2, num_workers=workers, collate_fn=lambda b: b, persistent_workers=workers > 0, shuffle=True
        )
        sum(len(b) for b in loader)  # warm-up epoch: worker start, page cache
        t = time.perf_counter()
        count = sum(len(b) for _ in range(3) for b in loader)
        dt = time.perf_counter() - t
        row[f"read{workers}w_MB_s"] = stored_per_sample * count / dt / 1e6
        row[f"read{workers}w_samples_s"] = count / dt
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=8)
    args = ap.parse_args()
    t = time.perf_counter()
    feats = backbone_features(args.samples, args.size)
    print(f"computed {args.samples} feature sets in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="fcache-bench-"))
    try:
        rows = [run(dt, feats, args.shard_size, args.size, root) for dt in ("fp16", "bf16", "int8")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cols = [
        "dtype",
        "write_MB_s",
        "read0w_MB_s",
        "read2w_MB_s",
        "read0w_samples_s",
        "read2w_samples_s",
        "MB_per_sample",
        "p2_KB",
        "p3_KB",
        "p4_KB",
        "p5_KB",
        "ratio",
        "rel_rmse",
    ]
    print(f"store I/O, SwinV2-B-shaped features at {args.size}, {args.samples} samples, codec zstd (MB = stored dtype, uncompressed)")
    print(table(rows, cols))
    print(f"results: {save('store_io', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
