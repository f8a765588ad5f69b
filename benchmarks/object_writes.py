"""Conditional writes of the commit protocol through s3fs (fcache's ``ObjectBackend``) and through obstore, on moto.

The operations a unit's commit and its leases are made of: an exclusive create (``If-None-Match: *``), a create that
loses (the object exists: s3fs's backend then reads it back to tell its own lost reply from another's record),
a compare-and-swap by ETag (``If-Match``) and a conditional delete (``DELETE If-Match``, which obstore does not
offer). Milliseconds per operation, one at a time (the protocol's are), median of ``--repeats`` rounds of ``--n``
operations, on a moto server on 127.0.0.1 (the dev extra): its own time per request is part of every figure, so
only the difference between the clients says something, and only at this latency (zero).
Usage: python benchmarks/object_writes.py [--n 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from fcache.store.backends.objects import ObjectBackend  # noqa: E402

OPS = ["create", "create, lost", "swap", "remove"]
COLS = ["client", *(f"{op} ms" for op in OPS)]


def moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    for _ in range(200):
        try:
            client.list_buckets()
            return proc
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.05)
    raise RuntimeError("moto did not start")


def per_op(fn: Callable[[int], object], n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e3


def s3fs_round(url: str, n: int) -> dict[str, float]:
    b = ObjectBackend(url, reader="fsspec")
    tags: dict[int, str | None] = {}
    out = {"create": per_op(lambda i: tags.__setitem__(i, b.create(f"a/{i}", b"x" * 200)), n)}
    out["create, lost"] = per_op(lambda i: b.create(f"a/{i}", b"y" * 200), n)
    out["swap"] = per_op(lambda i: tags.__setitem__(i, b.swap(f"a/{i}", b"z" * 200, str(tags[i]))), n)
    out["remove"] = per_op(lambda i: b.remove(f"a/{i}", str(tags[i])), n)
    return out


def obstore_round(url: str, endpoint: str, n: int) -> dict[str, float]:
    import obstore
    from obstore.exceptions import AlreadyExistsError
    from obstore.store import S3Store

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    store = S3Store(bucket, prefix=prefix, endpoint=endpoint, client_options={"allow_http": True})
    tags: dict[int, str | None] = {}

    def lost(i: int) -> None:
        try:
            obstore.put(store, f"b/{i}", b"y" * 200, mode="create")
        except AlreadyExistsError:
            obstore.get(store, f"b/{i}").bytes()  # read back, as the backend does to compare with what it sent
            return
        raise AssertionError("a second create succeeded")

    out = {"create": per_op(lambda i: tags.__setitem__(i, obstore.put(store, f"b/{i}", b"x" * 200, mode="create")["e_tag"]), n)}
    out["create, lost"] = per_op(lost, n)
    out["swap"] = per_op(lambda i: tags.__setitem__(i, obstore.put(store, f"b/{i}", b"z" * 200, mode={"e_tag": tags[i]})["e_tag"]), n)
    out["remove"] = float("nan")  # obstore has no conditional DELETE
    obstore.delete(store, [f"b/{i}" for i in range(n)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    proc = moto(port)
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        rounds: dict[str, list[dict[str, float]]] = {"s3fs": [], "obstore": []}
        for r in range(args.repeats):  # the clients interleaved
            rounds["s3fs"].append(s3fs_round(f"s3://{bucket}/r{r}", args.n))
            rounds["obstore"].append(obstore_round(f"s3://{bucket}/r{r}", endpoint, args.n))
    finally:
        proc.terminate()
    rows = [{"client": c, **{f"{op} ms": statistics.median(x[op] for x in rs) for op in OPS}} for c, rs in rounds.items()]
    print(table(rows, COLS))
    load = os.getloadavg()[0]
    print(f"load average (1 minute): {load:.1f} on {os.cpu_count()} cores")
    print(f"results: {save('object_writes', {'rows': rows, 'load_average': load, 'cores': os.cpu_count()})}")


if __name__ == "__main__":
    main()
