"""A fault-injecting S3 proxy on 127.0.0.1, for tests and demos.

It sits between a client and a real S3 server (SeaweedFS, moto, MinIO) and, by a seeded
schedule, answers a share of the requests with what production S3 does on a bad day:

* ``slowdown`` -- 503 SlowDown, the request not applied;
* ``internal`` -- 500 InternalError, applied or not (half each);
* ``reset`` -- the connection dropped, before or after the request took effect;
* ``stall`` -- the request applied, the response held past the client's read timeout;
* ``truncate`` -- the response headers promise the whole body, half of it arrives.

Built on aiohttp (already under s3fs). Requests are forwarded with their ``Host``
header, so SigV4 signatures still verify upstream. From the command line::

    python -m cloudckpt.testing.faults --upstream http://127.0.0.1:8333 --rate 0.15
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from cloudckpt.testing.local_s3 import HOST

KINDS = ("slowdown", "internal", "reset", "stall", "truncate")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "upgrade", "te", "trailer"}
_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message} (injected by cloudckpt.testing.faults)</Message></Error>"
)


@dataclass(frozen=True)
class FaultPlan:
    """Which share of requests fail, how, and the seed of the schedule."""

    rate: float = 0.1
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    #: How long a stalled response is held before the connection is dropped; set it
    #: above the client's read timeout.
    stall_seconds: float = 3.0
    #: A regular expression; if set, only requests whose ``"METHOD /path?query"`` it
    #: matches (``re.search``) may fail, e.g. ``"partNumber=2"`` or ``"^PUT .*/blobs/"``.
    only: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"need 0 <= rate <= 1 and kinds from {KINDS}, got {self}")


class FaultProxy:
    """An HTTP proxy to ``upstream`` that injects faults by ``plan``; a context manager.

    ``counts`` holds the number of requests while faults were on (``"requests"``), while
    they were paused (``"paused"``), and of each fault kind.
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None, port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self._enabled = True
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.endpoint = ""

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"fault proxy did not start: {failure or 'timeout'}")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped and self._thread:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def storage_options(self, credentials: dict[str, Any]) -> dict[str, Any]:
        """``credentials`` (key/secret...) with this proxy as the endpoint."""
        return {**credentials, "endpoint_url": self.endpoint}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forward faithfully inside the block (e.g. while a test checks the result)."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def faults(self) -> int:
        return sum(n for k, n in self.counts.items() if k in KINDS)

    # -- serving -------------------------------------------------------------------
    async def _serve(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, HOST, self._port)
        await site.start()
        port = runner.addresses[0][1]
        self.endpoint = f"http://{HOST}:{port}"
        async with ClientSession(
            auto_decompress=False, timeout=ClientTimeout(total=600)
        ) as self._session:
            ready.set()
            await self._stopped.wait()
        await runner.cleanup()

    def _draw(self, request: web.Request) -> tuple[str | None, bool]:
        with self._lock:
            if not self._enabled:
                self.counts["paused"] += 1
                return None, False
            self.counts["requests"] += 1
            if self.plan.only and not re.search(
                self.plan.only, f"{request.method} {request.path_qs}"
            ):
                return None, False
            if self._rng.random() >= self.plan.rate:
                return None, False
            return self._rng.choice(self.plan.kinds), self._rng.random() < 0.5

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        kind, after = self._draw(request)
        if kind == "slowdown" or (kind in ("internal", "reset") and not after):
            return self._fail(request, kind)
        status, headers, payload = await self._forward(request, body)
        if kind == "truncate" and (len(payload) < 2 or request.method == "HEAD"):
            kind = "reset"  # no body to cut short
        if kind in ("internal", "reset"):
            return self._fail(request, kind)
        if kind == "stall":
            self.counts["stall"] += 1
            await asyncio.sleep(self.plan.stall_seconds)
            return self._fail(request, "reset", count=False)
        response = web.StreamResponse(status=status, headers=headers)
        try:
            await response.prepare(request)
            if kind == "truncate":
                self.counts["truncate"] += 1
                await response.write(payload[: len(payload) // 2])
                return self._fail(request, "reset", count=False)
            if request.method != "HEAD":
                await response.write(payload)
            await response.write_eof()
        except ConnectionResetError:  # the client gave up on us (its timeout)
            return self._fail(request, "reset", count=False)
        return response

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, Any, bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
        ) as upstream:
            payload = await upstream.read()
            out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
            return upstream.status, out, payload

    def _fail(self, request: web.Request, kind: str, count: bool = True) -> web.StreamResponse:
        if count:
            self.counts[kind] += 1
        if kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to send on a dropped connection
        code, status, message = {
            "slowdown": ("SlowDown", 503, "Please reduce your request rate."),
            "internal": ("InternalError", 500, "We encountered an internal error."),
        }[kind]
        return web.Response(
            status=status,
            text=_ERROR.format(code=code, message=message),
            content_type="application/xml",
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cloudckpt.testing.faults", description=__doc__)
    p.add_argument("--upstream", required=True, help="the S3 endpoint to forward to")
    p.add_argument("--rate", type=float, default=0.1, help="share of requests that fail")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {KINDS}")
    p.add_argument("--stall-seconds", type=float, default=3.0)
    p.add_argument("--only", default="", help='regex on "METHOD /path?query" that may fail')
    p.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: any)")
    a = p.parse_args(argv)
    plan = FaultPlan(a.rate, a.seed, tuple(a.kinds.split(",")), a.stall_seconds, a.only)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with FaultProxy(a.upstream, plan, a.port) as proxy:
        print(f"fault proxy on {proxy.endpoint} -> {proxy.upstream} ({plan})", flush=True)
        with suppress(KeyboardInterrupt):
            done.wait()
        print(f"counts: {dict(proxy.counts)}", flush=True)


if __name__ == "__main__":
    main()
