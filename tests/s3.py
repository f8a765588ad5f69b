"""An S3-compatible server on loopback for the tests: moto in server mode, in its own process (a dev dependency).

``S3Server.start()`` picks a free port on 127.0.0.1 and sets the environment every client library reads
(``AWS_ENDPOINT_URL``, test credentials, region), so s3fs, boto3 and fcache's subprocesses reach it with no
option at all. Nothing but 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class S3Server:
    """A moto S3 server process; ``bucket()`` makes a fresh bucket and returns its ``s3://`` URL."""

    port: int = 0
    proc: subprocess.Popen | None = None
    saved: dict[str, str | None] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.port = free_port()
        cmd = [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV})
        wait_for_port(self.port)
        for k, v in {**ENV, "AWS_ENDPOINT_URL": self.endpoint}.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def stop(self) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self) -> str:
        name = f"fcache-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"
