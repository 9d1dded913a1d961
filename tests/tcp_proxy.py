"""A TCP proxy on 127.0.0.1 that forwards to a real server until a chosen request, then
plays a dying endpoint: one that refuses connections, or one that accepts them and
never answers. Threads and sockets only; ``stop()`` (or leaving the ``with`` block)
closes every socket it opened and joins every thread it started."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from typing import Any

HOST = "127.0.0.1"
#: A request line of HTTP/1.1, where a client's request starts.
_REQUEST = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (/\S*) HTTP/1\.1\r\n")
FORWARD, REFUSE, SILENT = "forward", "refuse", "silent"


class DyingEndpoint:
    """Forwards to ``upstream`` (``host:port``) until the ``after``-th request whose
    ``"METHOD /path"`` matches ``pattern`` (that request is not forwarded), then turns
    ``mode``: ``"refuse"`` closes the listening socket and resets every connection;
    ``"silent"`` keeps accepting, reads everything and answers nothing.

    ``requests`` counts request lines seen; ``after_switch`` those seen after the switch;
    ``switched_at`` is the ``time.monotonic()`` of the switch (None before).
    """

    def __init__(self, upstream: str, mode: str, pattern: str = "", after: int = 0) -> None:
        if mode not in (REFUSE, SILENT):
            raise ValueError(f"mode must be {REFUSE!r} or {SILENT!r}")
        host, _, port = upstream.rpartition(":")
        self.upstream = (host.split("//")[-1], int(port))
        self.mode = mode
        self._pattern = re.compile(pattern.encode())
        self._after = after
        self.state = FORWARD
        self.requests = 0
        self.matched = 0
        self.after_switch = 0
        self.switched_at: float | None = None
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{HOST}:{self.port}"
        if after <= 0:
            self._switch()

    # -- life cycle ----------------------------------------------------------------
    def __enter__(self) -> DyingEndpoint:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for s in sockets:
            _reset(s)
        for t in self._threads:
            t.join(timeout=10)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"proxy threads still running: {alive}"

    def storage_options(self, credentials: dict[str, Any]) -> dict[str, Any]:
        return {**credentials, "endpoint_url": self.endpoint}

    # -- serving -------------------------------------------------------------------
    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name="dying-endpoint")
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed: refusing from now on, or stopped
                return
            self._track(client)
            if self.state == SILENT:
                self._spawn(self._swallow, client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            self._track(upstream)
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        while not self._stopped.is_set():
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if from_client and data and self._count(data) and self.state == REFUSE:
                data = b""  # the request that turned the endpoint: reset, not forwarded
            if self.state == SILENT:
                if from_client:  # keep the client's connection open, answer nothing
                    self._swallow(src)
                return
            if not data or self.state == REFUSE:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        _reset(src)
        _reset(dst)

    def _swallow(self, conn: socket.socket) -> None:
        """Read and drop whatever the client sends until it hangs up or we stop."""
        conn.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                data = conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            self._count(data)
        _reset(conn)

    def _count(self, data: bytes) -> bool:
        """Count the request lines in ``data``; True if one of them made the switch."""
        turned = False
        for m in _REQUEST.finditer(data):
            with self._lock:
                self.requests += 1
                if self.switched_at is not None:
                    self.after_switch += 1
                    continue
                if self._pattern.search(m.group(1) + b" " + m.group(2)):
                    self.matched += 1
                    if self.matched >= self._after:
                        turned = True
            if turned:
                self._switch()
        return turned

    def _switch(self) -> None:
        with self._lock:
            if self.switched_at is not None:
                return
            self.switched_at = time.monotonic()
            self.state = self.mode
            sockets = list(self._sockets) if self.mode == REFUSE else []
        if self.mode == REFUSE:
            _reset(self._listener)
            for s in sockets:
                _reset(s)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)
        if self._stopped.is_set() or (self.state == REFUSE and s is not self._listener):
            _reset(s)


def _reset(s: socket.socket) -> None:
    """Close at once, with a reset rather than an orderly end where it is a connection."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
