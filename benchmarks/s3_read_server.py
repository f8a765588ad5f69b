"""A small, fast, read-only S3-compatible server for the object-store benchmark (moto is far too slow to time).

Serves ``s3://BUCKET/<key>`` from ``ROOT/<key>`` on 127.0.0.1: GET (whole object or a ``Range``, suffix ranges too)
and HEAD, S3's ``NoSuchKey`` for anything else, after sleeping DELAY_MS per request: the first-byte latency of a
real object store, injected here. Prints ``READY`` once listening.
Usage: python benchmarks/s3_read_server.py PORT BUCKET ROOT DELAY_MS
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import sys

from aiohttp import web

NO_KEY = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>'


def main() -> None:
    port, bucket, root, delay = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]) / 1000

    async def handle(request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        name, _, key = request.path.lstrip("/").partition("/")
        path = os.path.join(root, key)
        if name != bucket or not key or not os.path.isfile(path):
            return web.Response(status=404, body=None if request.method == "HEAD" else NO_KEY, content_type="application/xml")
        st = os.stat(path)
        start, end, status = 0, st.st_size - 1, 200
        headers = {
            "ETag": f'"{hashlib.md5(f"{path}{st.st_mtime_ns}".encode()).hexdigest()}"',
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
            "Content-Type": "binary/octet-stream",
        }
        spec = request.headers.get("Range")
        if spec:
            a, _, z = spec.split("=", 1)[1].partition("-")
            start = max(0, st.st_size - int(z)) if a == "" else int(a)
            end = end if a == "" or not z else min(int(z), end)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{st.st_size}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(end - start + 1)
            return web.Response(status=status, headers=headers)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *a: print("READY", flush=True), access_log=None)


if __name__ == "__main__":
    main()
