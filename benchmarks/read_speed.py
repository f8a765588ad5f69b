"""Read and write speed of a store against the codec's own speed, in one run: the ratio is what counts.

For two chunk shapes (A: demo-sized, SwinV2-T@256 in fp16; B: SwinV2-L@1024 in bf16, p2..p5, 47 MB per sample),
a store of synthetic backbone-like features (bf16 precision, per-channel scale and shift) is written with fcache's
own writer, then read as training reads it: random samples in batches of 8, every level, through the torch
Dataset as the training loader reads it (``FeatureDataset(stored=True).__getitems__`` and the batch's levels
collated, ``fcache.store.transit.stack``: the stored values the training device decodes; ``ratio_vs_raw_pool``), as
float32 tensors (``stored=False``: the Dataset's own decoding, what training received before), and as the direct path
returns them (``ShardFetcher.read``: stored values in fresh arrays). The baseline is raw Blosc decoding of the very same
chunk frames, already in memory, on one thread and on the reader's pool of threads. MB are the stored dtype's bytes.
Each round takes every reading once (interleaved); a figure is the best of the rounds. ``cpu_ratio_vs_raw_pool``:
the CPU seconds (all threads) of raw pool decoding over those of the training loader's read, the least of the rounds
each: how much work the loader adds to the codec's, which a loaded machine changes much less than the wall ratio.

Compact forms (``--forms``): the same features stored in bf16 and in each compact form, read through the Dataset on
the same threads; the ratio of samples/s against the bf16 store is the goal's (decoding must not slow training:
at least 0.8).

Also: zarr's own per-sample path (``read_path="zarr"``) for comparison, the writer's samples/s at shape B against
the bare forward rate of SwinV2-L@1024 on an H100 (10.2 images/s: ``fcache.extract.throughput``) with a profile of
where the writer's time goes, and (``--headroom``) the loader's samples/s over what ``bifpn:layers=5`` consumes at
shape B on this machine (``fcache bench --features-only``).

Usage: python benchmarks/read_speed.py [--shapes A,B] [--samples-a 64] [--samples-b 16] [--rounds 3] [--headroom]
       [--forms int6,int4,int3,int2,bf16m3,pca8 | --forms ""] [--only-forms]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
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
from fcache.store import layout  # noqa: E402
from fcache.store.dtypes import DTYPES  # noqa: E402
from fcache.store.fetch import decoder  # noqa: E402
from fcache.store.transit import stack  # noqa: E402

# name -> (input px, ((level, channels, stride), ...), dtype, shard size)
SHAPES = {
    "A": (256, (("p2", 96, 4), ("p3", 192, 8), ("p4", 384, 16), ("p5", 768, 32)), "fp16", 16),
    "B": (1024, (("p2", 192, 4), ("p3", 384, 8), ("p4", 768, 16), ("p5", 1536, 32)), "bf16", 8),
}
H100_FORWARD_IMG_S = 10.2  # SwinV2-L@1024, bare forward, bf16 (fcache.extract.throughput)
BATCH = 8


def features(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    """Backbone-like float32 features (N, 1, C, H, W): normal x per-channel scale + shift, a little spatial
    correlation, bf16 precision (what bf16-autocast extraction produces)."""
    x = rng.standard_normal((n, 1, c, h, w), dtype=np.float32)
    x += 0.5 * np.roll(x, 1, axis=-1)
    x *= rng.uniform(0.2, 3.0, size=(n, 1, c, 1, 1)).astype(np.float32)
    x += rng.normal(0, 0.5, size=(n, 1, c, 1, 1)).astype(np.float32)
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def build(root: Path, name: str, n: int, form: str | None = None) -> tuple[Path, dict]:
    """The store of shape ``name`` with n samples (in ``form``, default the shape's dtype); the writer's seconds (and
    profile) as it was written. The features are the same whatever the form."""
    size, levels, dtype, shard = SHAPES[name]
    dtype = form or dtype
    keys = [f"s{i:06d}" for i in range(n)]
    m = Manifest(
        BackboneInfo("bench", "bench", "random-init", size, 8, tuple(LevelSpec(*lv) for lv in levels)),
        Preprocessing(),
        StorageSpec(dtype=dtype, codec="zstd", shard_size=shard),
        DatasetInfo(SourceConfig("bench", ""), n, keys_digest(keys)),
    )
    path = root / f"shape{name}-{dtype}.zarr"
    rng = np.random.default_rng(0)
    units = layout.units(n, shard)
    first = {lv.name: features(rng, len(units[0]), *m.level_shape(lv.name)) for lv in m.levels}
    bases = {lv: DTYPES[dtype].fit(x[:, 0]) for lv, x in first.items()} if DTYPES[dtype].fitted else {}
    w = fstore.create(path, m, keys, bases=bases)  # a projected form: fitted on the first unit, as extract does
    seconds, profile = 0.0, cProfile.Profile()
    for u in w.units:
        feats = first if u.index == 0 else {lv.name: features(rng, len(u), *m.level_shape(lv.name)) for lv in m.levels}
        status, geometry = np.ones(len(u), np.uint8), np.zeros((len(u), 1, len(GEOMETRY_FIELDS)), np.float32)
        t = time.perf_counter()
        profile.enable()
        w.write_unit(u, feats, status, geometry)
        profile.disable()
        seconds += time.perf_counter() - t
    w.finalize()
    return path, {"write_s": seconds, "profile": profile}


def frames(store: fstore.FeatureStore) -> list[tuple[bytes, np.ndarray]]:
    """Every feature chunk's Blosc frame (CRC stripped) with an output array of its size: the raw-decode workload."""
    out = []
    for lv in store.level_names:
        meta = json.loads(store.backend.get(f"{layout.FEATURES}/{lv}/zarr.json"))
        conf = meta["codecs"][0]["configuration"]
        chunk = conf["chunk_shape"]
        dtype = np.dtype(DTYPES[store.manifest.storage.dtype].numpy)
        for u in store.units:
            key = layout.shard_key(f"{layout.FEATURES}/{lv}", u.index, 2 + len(store.manifest.level_shape(lv)))
            raw = store.backend.get(key)
            n_chunks = len(u) * store.num_views
            index = np.frombuffer(raw[-(16 * n_chunks + 4) : -4], dtype="<u8").reshape(-1, 2)
            for offset, nbytes in index:
                out.append((raw[int(offset) : int(offset + nbytes) - 4], np.empty(chunk[2:], dtype=dtype)))
    return out


def stored_bytes(store: fstore.FeatureStore) -> int:
    """Bytes of one sample-view of every level in the stored form, uncompressed."""
    m = store.manifest
    d = {lv: DTYPES[m.storage.form(lv)] for lv in store.level_names}
    return sum(int(np.prod(d[lv].stored_shape(m.level_shape(lv)))) * d[lv].numpy.itemsize for lv in store.level_names)


def raw_decode_mb_s(work: list[tuple[bytes, np.ndarray]], pool: bool) -> tuple[float, float]:
    """MB/s of raw decoding and its CPU seconds (every thread of the process)."""
    from numcodecs import blosc

    def one(item: tuple[bytes, np.ndarray]) -> int:
        blosc.decompress(item[0], item[1])
        return item[1].nbytes

    t, cpu = time.perf_counter(), time.process_time()
    total = sum(decoder().map(one, work)) if pool else sum(map(one, work))
    return total / (time.perf_counter() - t) / 1e6, time.process_time() - cpu


def dataset_mb_s(path: Path, zarr_path: bool, stored: bool = False) -> tuple[float, float, float]:
    """MB/s, samples/s and CPU seconds of random batches through the Dataset (all levels, view 0), one pass over the
    store; with ``stored`` the stored values collated per level, as the training loader delivers them to the device."""
    store = fstore.open(path, read_path="zarr" if zarr_path else "direct")
    ds = store.dataset(stored=stored)
    per_sample = stored_bytes(store)
    order = np.random.default_rng(1).permutation(len(ds))

    def batch(js: np.ndarray) -> None:
        items = ds.__getitems__([int(j) for j in js])
        for lv in ds.levels if stored else ():
            stack([it["features"][lv] for it in items])

    batch(order[:BATCH])  # indexes, handles, threads
    t, cpu = time.perf_counter(), time.process_time()
    for k in range(0, len(order), BATCH):
        batch(order[k : k + BATCH])
    dt = time.perf_counter() - t
    return per_sample * len(order) / dt / 1e6, len(order) / dt, time.process_time() - cpu


def stored_mb_s(path: Path) -> float:
    """MB/s of the direct path's stored values (``ShardFetcher.read``: no float32 conversion), random batches of 8."""
    store = fstore.open(path)
    fetcher = store.fetcher
    assert fetcher is not None
    order = [int(i) for i in np.random.default_rng(1).permutation(store.ok_indices)]
    fetcher.read([(lv, i, 0) for i in order[:BATCH] for lv in store.level_names])
    t = time.perf_counter()
    for k in range(0, len(order), BATCH):
        fetcher.read([(lv, i, 0) for i in order[k : k + BATCH] for lv in store.level_names])
    return stored_bytes(store) * len(order) / (time.perf_counter() - t) / 1e6


def one_round(path: Path, work: list[tuple[bytes, np.ndarray]]) -> dict[str, tuple[float, ...]]:
    """Every reading of a shape once (MB/s first, CPU seconds last where measured): rounds interleave them, so a change
    of load on a shared machine falls on all of them alike."""
    return {
        "raw1": raw_decode_mb_s(work, pool=False),
        "rawp": raw_decode_mb_s(work, pool=True),
        "direct": dataset_mb_s(path, zarr_path=False, stored=True),
        "float32": dataset_mb_s(path, zarr_path=False),
        "stored": (stored_mb_s(path),),
        "zarr": dataset_mb_s(path, zarr_path=True),
    }


def compact_rows(root: Path, name: str, n: int, forms: list[str], rounds: int) -> list[dict]:
    """Samples/s through the Dataset of the same features in bf16 and in each compact form, and the ratio to bf16."""
    rows = []
    base = 0.0
    for form in ["bf16", *forms]:
        path, written = build(root, name, n, form)
        samples_s = max(dataset_mb_s(path, zarr_path=False)[1] for _ in range(rounds))
        base = base or samples_s
        disk = sum(layout.disk_bytes(path / layout.FEATURES / lv) + layout.disk_bytes(path / layout.SCALES / lv)
                   for lv in fstore.open(path).level_names)  # fmt: skip
        values = n * sum(int(np.prod(fstore.open(path).manifest.level_shape(lv))) for lv in fstore.open(path).level_names)
        rows.append({"shape": name, "form": form, "bits_per_value": 8 * disk / values, "samples_s": samples_s,
                     "ratio_vs_bf16": samples_s / base, "write_samples_s": n / written["write_s"]})  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)
    return rows


def writer_profile(profile: cProfile.Profile, top: int = 10) -> list[str]:
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1 :]


def headroom_consumed(samples: int) -> float | None:
    """Samples/s that bifpn:layers=5 trains on at SwinV2-L@1024 shapes here (``fcache bench --features-only``)."""
    cmd = [sys.executable, "-m", "fcache", "bench", "--task", "detection", "--model", "swinv2-l", "--input-size", "1024"]
    cmd += ["--batch-size", str(samples), "--iters", "1", "--features-only", "--device", "cpu", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr)
        return None
    (row,) = json.loads(r.stdout)["rows"] if isinstance(json.loads(r.stdout), dict) else json.loads(r.stdout)
    return samples / row["s_per_iter"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="A,B")
    ap.add_argument("--samples-a", type=int, default=64)
    ap.add_argument("--samples-b", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="Each measurement's best of this many rounds.")
    ap.add_argument("--headroom", action="store_true", help="Also time bifpn:layers=5 at shape B (minutes on a CPU).")
    ap.add_argument("--forms", default="int6,int4,int3,int2,bf16m3,pca8", help="Compact forms read against bf16 ('' for none).")
    ap.add_argument("--only-forms", action="store_true", help="Measure only the compact forms against bf16.")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fcache-read-speed-"))
    rows, notes, compact = [], {}, []
    try:
        for name in args.shapes.split(","):
            n = args.samples_a if name == "A" else args.samples_b
            if args.forms:
                compact += compact_rows(root, name, n, args.forms.split(","), args.rounds)
            if args.only_forms:
                continue
            path, written = build(root, name, n)
            store = fstore.open(path)
            per_sample = stored_bytes(store)
            work = frames(store)
            rounds = [one_round(path, work) for _ in range(args.rounds)]
            best = {k: max((r[k] for r in rounds), key=lambda m: m[0]) for k in rounds[0]}
            raw1, rawp, raw_values = best["raw1"][0], best["rawp"][0], best["stored"][0]
            direct, as_float, plain = best["direct"], best["float32"], best["zarr"]
            cpu = {k: min(r[k][-1] for r in rounds) for k in ("rawp", "direct")}
            row = {
                "shape": name,
                "MB_per_sample": per_sample / 1e6,
                "samples": n,
                "raw_1t_MB_s": raw1,
                "raw_pool_MB_s": rawp,
                "dataset_MB_s": direct[0],
                "dataset_samples_s": direct[1],
                "ratio_vs_raw_pool": direct[0] / rawp,
                "cpu_ratio_vs_raw_pool": cpu["rawp"] / cpu["direct"],
                "ratio_vs_raw_1t": direct[0] / raw1,
                "float32_MB_s": as_float[0],
                "float32_ratio_vs_raw_pool": as_float[0] / rawp,
                "stored_MB_s": raw_values,
                "stored_ratio_vs_raw_pool": raw_values / rawp,
                "zarr_path_MB_s": plain[0],
                "zarr_ratio_vs_raw_pool": plain[0] / rawp,
                "write_samples_s": n / written["write_s"],
                "write_MB_s": per_sample * n / written["write_s"] / 1e6,
            }
            if name == "B":
                row["write_vs_h100_forward"] = row["write_samples_s"] / H100_FORWARD_IMG_S
                notes["writer_profile_B"] = writer_profile(written["profile"])
                if args.headroom:
                    consumed = headroom_consumed(2)
                    if consumed:
                        row["bifpn5_consumes_samples_s"] = consumed
                        row["loader_headroom"] = direct[1] / consumed
            rows.append(row)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if compact:
        print(f"compact forms against bf16, the same features through the Dataset ({os.cpu_count()} cores, best of {args.rounds})")
        print(table(compact, ["shape", "form", "bits_per_value", "samples_s", "ratio_vs_bf16", "write_samples_s"]))
    if args.only_forms:
        print(f"results: {save('read_speed', {'args': vars(args), 'compact': compact})}")
        return
    cols = ["shape", "MB_per_sample", "raw_1t_MB_s", "raw_pool_MB_s", "stored_MB_s", "stored_ratio_vs_raw_pool", "dataset_MB_s",
            "ratio_vs_raw_pool", "cpu_ratio_vs_raw_pool", "float32_MB_s", "float32_ratio_vs_raw_pool", "zarr_path_MB_s",
            "zarr_ratio_vs_raw_pool", "write_samples_s", "write_MB_s"]  # fmt: skip
    print(f"read and write speed against raw Blosc decode of the same chunks ({os.cpu_count()} cores, best of {args.rounds})")
    print(table(rows, cols))
    for row in rows:
        if "write_vs_h100_forward" in row:
            print(
                f"writer at shape B: {row['write_samples_s']:.2f} samples/s = {row['write_vs_h100_forward']:.2f}x the H100's bare forward"
            )
        if "loader_headroom" in row:
            print(f"loader headroom at shape B: {row['loader_headroom']:.1f} ({row['dataset_samples_s']:.2f} samples/s read, "
                  f"{row['bifpn5_consumes_samples_s']:.3f} consumed by bifpn:layers=5)")  # fmt: skip
    for line in notes.get("writer_profile_B", []):
        print("  " + line)
    print(f"results: {save('read_speed', {'args': vars(args), 'rows': rows, 'notes': notes, 'compact': compact})}")


if __name__ == "__main__":
    main()
