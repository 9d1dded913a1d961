"""A local Azure Blob Storage on loopback for tests and users: Azurite.

``Azurite`` runs ``azurite-blob`` (the npm package ``azurite``, which ``make test``
installs into ``.azurite/``) on a free port of 127.0.0.1, waits until a container can be
created, and stops its own process (by PID) on ``stop()`` or on exit of a ``with`` block.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from cloudckpt.testing.local_s3 import HOST, _Server, free_port, serve

#: Azurite's well-known development account (published in Azurite's documentation).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
#: Where ``make test`` installs the npm package (relative to the repository root).
NPM_PREFIX = Path(__file__).resolve().parents[2] / ".azurite"


def azurite_binary() -> str:
    """``azurite-blob``: ``$AZURITE_BLOB``, the Makefile's ``.azurite/``, or the PATH."""
    candidates = [
        os.environ.get("AZURITE_BLOB", ""),
        str(NPM_PREFIX / "node_modules/.bin/azurite-blob"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("azurite-blob")
    if not found:
        raise RuntimeError(
            "'azurite-blob' not found: run `make test` once (it installs the npm package "
            f"azurite into {NPM_PREFIX}), or `npm install --prefix .azurite azurite`"
        )
    return found


class Azurite(_Server):
    """``azurite-blob`` on a free loopback port, data in a temporary directory."""

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, timeout: float = 60
    ) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="cloudckpt-azurite-")
        data = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        data.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.endpoint = f"http://{HOST}:{port}/{ACCOUNT}"
        self._log = open(data / "azurite.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                azurite_binary(),
                "--blobHost",
                HOST,
                "--blobPort",
                str(port),
                "--location",
                str(data),
                "--loose",
                "--skipApiVersionCheck",
                "--disableTelemetry",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._shared_container: str | None = None
        self._wait_ready(timeout)

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for ``cloudckpt.Repo`` / adlfs."""
        return {"connection_string": self.connection_string}

    def env(self) -> dict[str, str]:
        """The standard Azure environment that points a child process at this server."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def client(self, **kwargs: Any) -> Any:
        """A synchronous ``azure.storage.blob.BlobServiceClient`` of this server
        (``kwargs``: the SDK's client settings)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string, **kwargs)

    def fresh_uri(self, name: str = "run") -> str:
        """``az://<container>/<name>-<random>``: a new, empty prefix in one shared container."""
        if self._shared_container is None:
            self._shared_container = self.create_bucket()
        return f"az://{self._shared_container}/{name}-{uuid.uuid4().hex[:10]}"

    def create_bucket(self, name: str | None = None) -> str:
        """Create a container (a fresh random name by default) and return its name."""
        name = name or f"ckpt-{uuid.uuid4().hex[:12]}"
        with self.client(retry_total=0) as client:  # the ready loop polls: no SDK backoff
            client.create_container(name)
        return name

    def uncommitted_blobs(self, uri: str) -> list[str]:
        """Names under ``uri`` (``az://container/prefix``) that have only uncommitted
        blocks: what an upload that never committed left."""
        container, _, prefix = uri.split("://", 1)[1].partition("/")
        with self.client() as client:
            listing = client.get_container_client(container)
            base = f"{prefix.rstrip('/')}/" if prefix else ""
            committed = {b.name for b in listing.list_blobs(name_starts_with=base)}
            every = listing.list_blobs(name_starts_with=base, include=["uncommittedblobs"])
            return sorted(b.name for b in every if b.name not in committed)

    def stop(self) -> None:
        super().stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def main(argv: list[str] | None = None) -> None:
    """Serve a local Azure Blob Storage on 127.0.0.1 until interrupted (infra/local-azure.sh)."""
    p = argparse.ArgumentParser(
        prog="python -m cloudckpt.testing.local_azure", description=main.__doc__
    )
    p.add_argument("--dir", help="data directory (default: a temporary one)")
    p.add_argument("--container", default="checkpoints", help="container to create")
    a = p.parse_args(argv)
    serve(Azurite(a.dir), a.container, "az://", quote=True)


if __name__ == "__main__":
    main()
