"""Read throughput of a store in object storage against the same store on local disk, per S3 read client.

One store per chunk size is written to local disk: ``demo`` (SwinV2-T at 256, level p3: 192 x 32 x 32 fp16, 0.39 MB
per sample-view) and ``swinv2-l`` (SwinV2-L at 1024, level p3: 384 x 128 x 128 fp16, 12.6 MB per sample-view), with
features like a backbone's (ReLU'd, fp16). The same folder is then served over the S3 API on 127.0.0.1 by
``s3_read_server.py`` (moto, which copies a whole object for every ranged GET, is far too slow to time), which
sleeps 0 or 20 ms per request: injected first-byte latency. A reader reads the same random sample-views in batches
of k (``FeatureStore.read_many``: k range requests in flight at once), after one pass that reads each shard's index,
through each S3 read client (``--clients``: s3fs, the one before obstore, and obstore), the clients interleaved at
every k; then the same sample-views in the same order read ahead (``FeatureStore.read_stream(window=k)``: k range
requests kept in flight, each chunk decoded as it lands; the passes one stream, timed pass by pass), what an in-order
reader (an epoch's batches) gets. "in order" reads as many samples in index order (from sample 0), as evaluation,
predict and export read a store: read ahead, chunks back to back in a shard go in one request (up to
``readahead.RUN_BYTES``), against the direct path on the local files in the same order. MB/s are the stored dtype's
uncompressed bytes per second, the median of ``--repeats`` passes; ``spread`` is (max - min) / median of the 20 ms
passes. Local disk is read two ways: zarr's own path (``read_path="zarr"``, one sample-view at a time, once) and the
direct path on the local files (``ShardFetcher``: kept indexes, direct range reads, measured again at every k, between
the clients); ratios are against the faster. ``cached`` reads through
``--cache-dir`` after a first pass filled it (the first client only: no request leaves the cache). The second table
times the ranged GETs alone (no decoding): requests per second and the client's CPU per request at 0 ms. The third
reads the same sample-views through the training loader (``train_loader``: batches of k, no workers, the stored values
a training device decodes, epochs of the same samples), batch by batch and read ahead (k requests in flight), as a
ratio to the same loader on the local store (whose stored values, not converted to float32, read faster than the
first table's local path).
The summary names the smallest k that reaches 0.8 (and 1.0) of the local-disk rate at 20 ms, per client and read path.
Usage: python benchmarks/object_store.py [--sizes demo,swinv2-l] [--conc 1,2,4,8,16,32,64] [--repeats 3]
                                         [--clients s3fs,obstore] [--no-cached]
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
from types import SimpleNamespace

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
from fcache.store.backends.objects import ObjectBackend  # noqa: E402
from fcache.store.dtypes import decode  # noqa: E402
from fcache.store.fetch import ShardFetcher, decoder  # noqa: E402
from fcache.train_heads.data import train_loader  # noqa: E402

SIZES = {  # name -> (input size, channels of p3, samples, shard size, sample-views read per pass)
    "demo": (256, 192, 256, 16, 128),
    "swinv2-l": (1024, 384, 48, 8, 32),
}
BUCKET = "bench"
READERS = {"s3fs": "fsspec", "obstore": "obstore"}  # --clients name -> ObjectBackend's reader
COLS = ["chunks", "k", "client", "local zarr MB/s", "local direct MB/s", "S3 0ms MB/s", "S3 20ms MB/s", "spread 20ms", "ratio 20ms",
        "ahead 20ms MB/s", "spread ahead", "ratio ahead 20ms", "local direct in order MB/s", "ahead in order 20ms MB/s",
        "ratio ahead in order 20ms", "S3 20ms cached MB/s", "ratio cached"]  # fmt: skip
PATHS = {"ratio 20ms": "batches (read_many)", "ratio ahead 20ms": "read-ahead (read_stream)",
         "ratio ahead in order 20ms": "read-ahead in index order (read_stream)"}  # the summary's columns  # fmt: skip
GET_COLS = ["chunks", "k", "client", "GETs/s 0ms", "CPU ms per GET 0ms", "GETs/s 20ms"]
LOADER_COLS = ["chunks", "k", "client", "loader local MB/s", "loader 20ms MB/s", "loader ahead 20ms MB/s", "loader ratio",
               "loader ratio ahead"]  # fmt: skip
NO_TARGETS = SimpleNamespace(targets=lambda item, geometry: None)  # the loader's collation asks a task for nothing else here


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


def passes(store: fstore.FeatureStore | ShardFetcher, picks: list[int], k: int, repeats: int) -> list[float]:
    """MB/s of each of ``repeats`` passes reading ``picks`` (view 0 of level p3) in batches of k."""
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
    return rates


def streamed(store: fstore.FeatureStore, picks: list[int], k: int, repeats: int) -> list[float]:
    """MB/s of each of ``repeats`` passes reading ``picks`` (view 0 of level p3) read ahead, k requests in flight: one
    stream of all the passes, as an epoch's batches follow each other (the first pass also fills the window)."""
    per = int(np.prod(store.manifest.level_shape("p3"))) * 2
    rates, t = [], time.perf_counter()
    for n, _ in enumerate(store.read_stream([("p3", i, 0) for _ in range(repeats) for i in picks], window=k), 1):
        if n % len(picks) == 0:
            rates.append(len(picks) * per / (time.perf_counter() - t) / 1e6)
            t = time.perf_counter()
    return rates


def loaded(store: fstore.FeatureStore, picks: list[int], k: int, repeats: int, read_ahead: int) -> list[float]:
    """MB/s of each of ``repeats`` epochs of the training loader over ``picks`` (stored values of p3, batches of k, no
    workers: its prefetch thread reads), ``read_ahead`` range requests kept in flight (0: batch by batch)."""
    per = int(np.prod(store.manifest.level_shape("p3"))) * 2
    data = store.dataset(["p3"], indices=picks, stored=True)
    per_epoch = len(picks) // k
    batches = train_loader(data, NO_TARGETS, batch_size=k, seed=0, start=0, stop=repeats * per_epoch, num_workers=0,  # type: ignore[arg-type]
                           read_ahead=read_ahead)  # fmt: skip
    rates, t = [], time.perf_counter()
    for n, _ in enumerate(batches, 1):
        if n % per_epoch == 0:
            rates.append(per_epoch * k * per / (time.perf_counter() - t) / 1e6)
            t = time.perf_counter()
    return rates


def gets(store: fstore.FeatureStore, picks: list[int], k: int, repeats: int) -> tuple[float, float]:
    """Median ranged GETs per second (the chunks of ``picks``, k at once, not decoded) and the CPU seconds per GET."""
    fetcher = store.fetcher
    assert fetcher is not None
    views = store.manifest.num_views
    ranges = [fetcher.range_of(("p3", fetcher._unit(i).index, (i - fetcher._unit(i).start) * views)) for i in picks]  # view 0's chunk
    rates, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for b in range(0, len(ranges), k):
            store.backend.get_ranges(ranges[b : b + k])
        rates.append(len(ranges) / (time.perf_counter() - t))
        cpu.append((time.process_time() - c) / len(ranges))
    return statistics.median(rates), statistics.median(cpu)


def opened(url: str, port: int, client: str, cache: Path | None = None) -> fstore.FeatureStore:
    """The store over S3 read through ``client`` (the endpoint as a storage option, as a user would give it)."""
    backend = ObjectBackend(url, {"endpoint_url": f"http://127.0.0.1:{port}"}, reader=READERS[client])
    s = fstore.FeatureStore(backend, cache_dir=cache, cache_size="50GB")
    s.read_many([("p3", u.start, 0) for u in s.units])  # every shard's index and size read: the steady state of training
    return s


def spread(rates: list[float]) -> float:
    return (max(rates) - min(rates)) / statistics.median(rates)


def run(
    size: str, conc: list[int], repeats: int, root: Path, clients: list[str], cached: bool
) -> tuple[list[dict], list[dict], list[dict]]:
    path = build(root, size)
    n, picks_n = SIZES[size][2], SIZES[size][4]
    picks = [int(i) for i in np.random.default_rng(1).choice(n, size=picks_n, replace=False)]
    in_order = list(range(picks_n))  # as many samples, read as an evaluation reads them
    local = fstore.FeatureStore(path, read_path="zarr")
    passes(local, picks, 1, 1)  # page cache warm
    zarr_rate = statistics.median(passes(local, picks, 1, repeats))  # zarr's own read path
    direct = ShardFetcher(local.backend, local.manifest, local.ledger, None)  # the remote read path on the local files
    local_direct = fstore.FeatureStore(path)  # the training loader on the local files reads through the direct path too
    rows, get_rows, loader_rows = [], [], []
    servers = {d: serve(root, d) for d in (0, 20)}
    try:
        url = f"s3://{BUCKET}/{path.name}"
        for k in conc:
            for c, client in enumerate(clients):
                direct_rate = statistics.median(passes(direct, picks, len(picks), repeats))  # again next to every client
                local_rate = max(zarr_rate, direct_rate)
                row = {"chunks": size, "k": k, "client": client, "local zarr MB/s": zarr_rate, "local direct MB/s": direct_rate}
                stores = {d: opened(url, port, client) for d, (_, port) in servers.items()}
                row["S3 0ms MB/s"] = statistics.median(passes(stores[0], picks, k, repeats))
                at20 = passes(stores[20], picks, k, repeats)
                row["S3 20ms MB/s"], row["spread 20ms"] = statistics.median(at20), spread(at20)
                row["ratio 20ms"] = row["S3 20ms MB/s"] / local_rate
                ahead = streamed(stores[20], picks, k, repeats)
                row["ahead 20ms MB/s"], row["spread ahead"] = statistics.median(ahead), spread(ahead)
                row["ratio ahead 20ms"] = row["ahead 20ms MB/s"] / local_rate
                row["local direct in order MB/s"] = statistics.median(passes(direct, in_order, len(in_order), repeats))
                row["ahead in order 20ms MB/s"] = statistics.median(streamed(stores[20], in_order, k, repeats))
                row["ratio ahead in order 20ms"] = row["ahead in order 20ms MB/s"] / row["local direct in order MB/s"]
                if cached and c == 0:
                    cache = root / f"cache-{size}-{k}"
                    warm = opened(url, servers[20][1], client, cache)
                    passes(warm, picks, k, 1)  # fills the cache
                    row["S3 20ms cached MB/s"] = statistics.median(passes(warm, picks, k, repeats))
                    row["ratio cached"] = row["S3 20ms cached MB/s"] / local_rate
                    shutil.rmtree(cache, ignore_errors=True)
                rate0, cpu0 = gets(stores[0], picks, k, repeats)
                get_rows.append({"chunks": size, "k": k, "client": client, "GETs/s 0ms": rate0, "CPU ms per GET 0ms": cpu0 * 1e3,
                                 "GETs/s 20ms": gets(stores[20], picks, k, repeats)[0]})  # fmt: skip
                rows.append(row)
                local_loader = statistics.median(loaded(local_direct, picks, k, repeats, 0))
                batched, ahead = (statistics.median(loaded(stores[20], picks, k, repeats, a)) for a in (0, k))
                loader_rows.append({"chunks": size, "k": k, "client": client, "loader local MB/s": local_loader,
                                    "loader 20ms MB/s": batched, "loader ahead 20ms MB/s": ahead, "loader ratio": batched / local_loader,
                                    "loader ratio ahead": ahead / local_loader})  # fmt: skip
                print(table([row], COLS).splitlines()[-1], flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
    return rows, get_rows, loader_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="demo,swinv2-l")
    ap.add_argument("--conc", default="1,2,4,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", default="s3fs,obstore", help="S3 read clients, interleaved at every k: s3fs, obstore")
    ap.add_argument("--no-cached", dest="cached", action="store_false", help="skip the --cache-dir column")
    args = ap.parse_args()
    clients = args.clients.split(",")
    if unknown := set(clients) - set(READERS):
        ap.error(f"--clients: unknown {sorted(unknown)}; choose from {sorted(READERS)}")
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    conc = [int(c) for c in args.conc.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fcache-objbench-"))
    rows: list[dict] = []
    get_rows: list[dict] = []
    loader_rows: list[dict] = []
    loads = [os.getloadavg()[0]]
    try:
        for size in args.sizes.split(","):
            got, got_gets, got_loader = run(size, conc, args.repeats, root, clients, args.cached)
            rows, get_rows, loader_rows, loads = rows + got, get_rows + got_gets, loader_rows + got_loader, loads + [os.getloadavg()[0]]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, COLS))
    print(table(get_rows, GET_COLS))
    print(table(loader_rows, LOADER_COLS))
    summary: dict[str, dict] = {}
    for size in args.sizes.split(","):
        for client in clients:
            mine = [r for r in rows if r["chunks"] == size and r["client"] == client]
            for col, path in PATHS.items():
                got = {f"k for {g}": next((r["k"] for r in mine if r[col] >= g), None) for g in (0.8, 1.0)}
                summary[f"{size} {client} {path}"] = got
                k8, k10 = got["k for 0.8"], got["k for 1.0"]
                print(f"{size}, {client}, {path}: with 20 ms per request, 0.8 of the local-disk rate at k = {k8}, 1.0 at k = {k10}")
    # other work on the machine: every figure here is CPU-bound on a small machine
    print(f"load average (1 minute) at the start and after each size: {', '.join(f'{v:.1f}' for v in loads)} on {os.cpu_count()} cores")
    payload = {"rows": rows, "gets": get_rows, "loader": loader_rows, "summary": summary, "load_averages": loads, "cores": os.cpu_count()}
    print(f"results: {save('object_store', payload)}")


if __name__ == "__main__":
    main()
