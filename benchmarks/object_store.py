"""Read throughput of a store in object storage against the same store on local disk, with and without the disk cache.

One store per chunk size is written to local disk: ``demo`` (SwinV2-T at 256, level p3: 192 x 32 x 32 fp16, 0.39 MB
per sample-view) and ``swinv2-l`` (SwinV2-L at 1024, level p3: 384 x 128 x 128 fp16, 12.6 MB per sample-view), with
features like a backbone's (ReLU'd, fp16). The same folder is then served over the S3 API on 127.0.0.1 by
``s3_read_server.py`` (moto, which copies a whole object for every ranged GET, is far too slow to time), which
sleeps 0 or 20 ms per request: injected first-byte latency. A reader reads the same random sample-views in batches
of k (``FeatureStore.read_many``: k range requests in flight at once), after one pass that reads each shard's index;
MB/s are the stored dtype's uncompressed bytes per second, the median of ``--repeats`` passes. Local disk is read
two ways: zarr's own path (``read_path="zarr"``, one sample-view at a time) and the direct path on the local files
(``ShardFetcher``: kept indexes, direct range reads); ratios are against the faster. ``cached`` reads through
``--cache-dir`` after a first pass filled it. The summary names the smallest k that reaches 0.8 (and 1.0)
of the local-disk rate at 20 ms.
Usage: python benchmarks/object_store.py [--sizes demo,swinv2-l] [--conc 1,2,4,8,16,32,64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
from fcache.store.dtypes import decode  # noqa: E402
from fcache.store.fetch import ShardFetcher, decoder  # noqa: E402

SIZES = {  # name -> (input size, channels of p3, samples, shard size, sample-views read per pass)
    "demo": (256, 192, 256, 16, 128),
    "swinv2-l": (1024, 384, 48, 8, 32),
}
BUCKET = "bench"
COLS = ["chunks", "k", "local zarr MB/s", "local direct MB/s", "S3 0ms MB/s", "S3 20ms MB/s", "ratio 20ms", "S3 20ms cached MB/s",
        "ratio cached"]  # fmt: skip


def build(root: Path, size: str) -> Path:
    input_size, channels, n, shard, _ = SIZES[size]
    keys = [f"s{i}" for i in range(n)]
    m = Manifest(
        BackboneInfo(size, size, "random-init", input_size, 8, (LevelSpec("p3", channels, 8),)),
        Preprocessing(),
        StorageSpec(dtype="fp16", codec="zstd", shard_size=shard),
        DatasetInfo(SourceConfig("synthetic", ""), n=n, digest=keys_digest(keys)),
    )
    path = root / f"{size}.zarr"
    w = fstore.create(path, m, keys)
    rng = np.random.default_rng(0)
    side = input_size // 8
    for unit in w.units:
        k = len(unit)
        x = np.maximum(rng.standard_normal((k, 1, channels, side, side), dtype=np.float32) * 2 - 0.5, 0)  # ReLU'd, like features
        geometry = np.zeros((k, 1, len(GEOMETRY_FIELDS)), np.float32)
        w.write_unit(unit, {"p3": x}, np.ones(k, np.uint8), geometry)
    w.finalize()
    return path


def serve(root: Path, delay_ms: float) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("s3_read_server.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), BUCKET, str(root), str(delay_ms)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"READY")
    return proc, port


def passes(store: fstore.FeatureStore | ShardFetcher, picks: list[int], k: int, repeats: int) -> float:
    """Median MB/s of reading ``picks`` (view 0 of level p3) in batches of k."""
    per = int(np.prod(store.manifest.level_shape("p3"))) * 2
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in range(0, len(picks), k):
            batch = [("p3", i, 0) for i in picks[b : b + k]]
            if isinstance(store, fstore.FeatureStore):
                store.read_many(batch)
            else:  # the fetch path on local files, decoded to float32 as a FeatureStore does
                list(decoder().map(lambda v: decode(v, "fp16", None), store.read(batch)))
        rates.append(len(picks) * per / (time.perf_counter() - t) / 1e6)
    return statistics.median(rates)


def opened(url: str, port: int, cache: Path | None = None) -> fstore.FeatureStore:
    """The store over S3 (the endpoint as a storage option: fsspec keeps one filesystem per set of options)."""
    s = fstore.FeatureStore(url, storage_options={"endpoint_url": f"http://127.0.0.1:{port}"}, cache_dir=cache, cache_size="50GB")
    s.read_many([("p3", u.start, 0) for u in s.units])  # every shard's index and size read: the steady state of training
    return s


def run(size: str, conc: list[int], repeats: int, root: Path) -> list[dict]:
    path = build(root, size)
    n, picks_n = SIZES[size][2], SIZES[size][4]
    picks = [int(i) for i in np.random.default_rng(1).choice(n, size=picks_n, replace=False)]
    local = fstore.FeatureStore(path, read_path="zarr")
    passes(local, picks, 1, 1)  # page cache warm
    zarr_rate = passes(local, picks, 1, repeats)  # zarr's own read path
    direct = ShardFetcher(local.backend, local.manifest, local.ledger, None)  # the remote read path on the local files
    direct_rate = passes(direct, picks, len(picks), repeats)
    local_rate = max(zarr_rate, direct_rate)
    rows = []
    servers = {d: serve(root, d) for d in (0, 20)}
    try:
        url = f"s3://{BUCKET}/{path.name}"
        for k in conc:
            row = {"chunks": size, "k": k, "local zarr MB/s": zarr_rate, "local direct MB/s": direct_rate}
            for d, (_, port) in servers.items():
                row[f"S3 {d}ms MB/s"] = passes(opened(url, port), picks, k, repeats)
            cache = root / f"cache-{size}-{k}"
            warm = opened(url, servers[20][1], cache)
            passes(warm, picks, k, 1)  # fills the cache
            row["S3 20ms cached MB/s"] = passes(warm, picks, k, repeats)
            shutil.rmtree(cache, ignore_errors=True)
            row["ratio 20ms"] = row["S3 20ms MB/s"] / local_rate
            row["ratio cached"] = row["S3 20ms cached MB/s"] / local_rate
            rows.append(row)
            print(table([row], COLS).splitlines()[-1], flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="demo,swinv2-l")
    ap.add_argument("--conc", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    conc = [int(c) for c in args.conc.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fcache-objbench-"))
    rows: list[dict] = []
    try:
        for size in args.sizes.split(","):
            rows += run(size, conc, args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, COLS))
    summary = {}
    for size in args.sizes.split(","):
        mine = [r for r in rows if r["chunks"] == size]
        summary[size] = {f"k for {g}": next((r["k"] for r in mine if r["ratio 20ms"] >= g), None) for g in (0.8, 1.0)}
        k8, k10 = summary[size]["k for 0.8"], summary[size]["k for 1.0"]
        print(f"{size}: with 20 ms per request, 0.8 of the local-disk rate at k = {k8}, 1.0 at k = {k10}")
    load = os.getloadavg()[1]  # other work on the machine: every figure here is CPU-bound on a small machine
    print(f"load average over the last 5 minutes: {load:.1f} on {os.cpu_count()} cores")
    print(f"results: {save('object_store', {'rows': rows, 'summary': summary, 'load_average': load, 'cores': os.cpu_count()})}")


if __name__ == "__main__":
    main()
