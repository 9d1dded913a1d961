"""One version sent from one host's leader to another's over the checkpoint's gloo group.

A conversation between a sender and a receiver, in length-prefixed frames (an int64
header ``[kind, length]``, then the payload as a uint8 tensor; nothing is pickled):

1. the sender sends the version's manifest (JSON), or ``null`` when it has nothing;
2. the receiver answers with the digests its repository lacks (JSON);
3. the sender sends those blobs' raw bytes, one frame each, in that order.

Either side that fails sends an ``ABORT`` frame instead of its next message, so the other
never waits for a frame that will not come; a receiver that fails while blobs are still
coming reads the rest and drops them. Every wait is bounded by the group's timeout: a
peer that was killed, is frozen or is cut off raises RanksUnreachable (at once when its
connection closed, after the timeout when it just stopped answering).

The receiver publishes through :func:`cloudckpt.tiers.copy.copy_version`: each blob is
checked against its hash (by the copy) as it arrives (a damaged transfer raises
CorruptCheckpoint and publishes nothing) and blobs are received as the copy asks for them,
so no more than the copy's in-flight budget is held.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from cloudckpt.blobs import BlobReader, blob_key
from cloudckpt.errors import CloudCkptError, CorruptCheckpoint, RanksUnreachable
from cloudckpt.manifest import Manifest
from cloudckpt.tiers.copy import blobs_of, copy_version
from cloudckpt.versions import Version

if TYPE_CHECKING:
    from cloudckpt.distributed.collectives import Group
    from cloudckpt.repo import Repo

JSON, BLOB, ABORT = 1, 2, 3
#: Tags of the two directions of a conversation (sender -> receiver, and the reply).
FORWARD, REPLY = 0x7C1, 0x7C2


class PeerAborted(CloudCkptError):
    """The other side of a conversation failed (its error is in the message)."""


@dataclass
class Moved:
    """What one side of a conversation moved: blob frames and their payload bytes (and
    the blobs the receiver found on its own host instead)."""

    bytes: int = 0
    blobs: int = 0
    linked: int = 0


class Link:
    """Frames to and from one peer rank, on tag ``out`` and ``inn`` of ``group.pg``."""

    def __init__(self, group: Group, peer: int, out: int, inn: int) -> None:
        self.group, self.pg, self.peer, self.out, self.inn = group, group.pg, peer, out, inn

    def _send(self, kind: int, payload: torch.Tensor) -> None:
        header = torch.tensor([kind, payload.numel()], dtype=torch.int64)
        with self.group.answering(f"sending to rank {self.peer}"):
            dist.send(header, self.peer, group=self.pg, tag=self.out)
            if payload.numel():
                dist.send(payload, self.peer, group=self.pg, tag=self.out)

    def send_json(self, obj: Any) -> None:
        self._send(JSON, _bytes(json.dumps(obj).encode()))

    def send_blob(self, raw: np.ndarray) -> None:
        self._send(BLOB, torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)))

    def abort(self, error: BaseException) -> None:
        self._send(ABORT, _bytes(f"{type(error).__name__}: {error}"[:2000].encode()))

    def recv(self) -> tuple[int, torch.Tensor]:
        """The next frame: ``(kind, payload)``."""
        header = torch.empty(2, dtype=torch.int64)
        with self.group.answering(f"receiving from rank {self.peer}"):
            dist.recv(header, self.peer, group=self.pg, tag=self.inn)
        kind, size = int(header[0]), int(header[1])
        if kind not in (JSON, BLOB, ABORT) or size < 0:
            raise CorruptCheckpoint(f"rank {self.peer} sent a malformed frame {kind}/{size}")
        payload = torch.empty(size, dtype=torch.uint8)
        if size:
            with self.group.answering(f"receiving from rank {self.peer}"):
                dist.recv(payload, self.peer, group=self.pg, tag=self.inn)
        return kind, payload

    def recv_json(self) -> Any:
        kind, payload = self.recv()
        if kind == ABORT:
            raise PeerAborted(
                f"rank {self.peer}: {bytes(payload.numpy()).decode(errors='replace')}"
            )
        if kind != JSON:
            raise CorruptCheckpoint(f"rank {self.peer} sent a blob where a message was due")
        return json.loads(bytes(payload.numpy()))


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def send(link: Link, find: Callable[[], tuple[Repo, Version] | None]) -> Moved:
    """The sender's side: the version ``find()`` names (in its repository), or nothing
    when it returns None, to the peer."""
    moved = Moved()
    try:
        found = find()
        doc = None if found is None else found[0].manifest(found[1])
        sizes = {d: b.size for d, b in blobs_of(doc).items()} if doc is not None else {}
    except BaseException as e:
        link.abort(e)
        raise
    link.send_json(None if doc is None else json.loads(doc.encode()))
    if found is None or doc is None:
        return moved
    repo = found[0]
    lack = link.recv_json()  # the receiver's failure ends the conversation here
    if not isinstance(lack, list) or not all(d in sizes for d in lack):
        error = CorruptCheckpoint(f"rank {link.peer} asked for blobs this version lacks")
        link.abort(error)
        raise error
    read = BlobReader(repo.store, repo.options.transfer).raw  # verified against the hash
    for digest in lack:
        try:
            raw = read(digest, sizes[digest])
        except BaseException as e:
            link.abort(e)
            raise
        link.send_blob(raw)
        moved.bytes += raw.nbytes
        moved.blobs += 1
    return moved


class _Inbox:
    """The blobs of one conversation, received in the announced order as the copy's
    workers ask for them (a blob received for another worker waits here for it)."""

    def __init__(self, link: Link, order: list[tuple[str, int]]) -> None:
        self.link, self.order = link, order
        self.next = 0
        self.ended = False  # the sender aborted, or the conversation was drained
        self.aborted: PeerAborted | None = None
        self.held: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()
        self.moved = Moved()

    def _one(self) -> tuple[str, torch.Tensor]:
        digest, size = self.order[self.next]
        self.next += 1
        kind, payload = self.link.recv()
        if kind == ABORT:
            self.ended = True
            message = bytes(payload.numpy()).decode(errors="replace")
            self.aborted = PeerAborted(f"rank {self.link.peer}: {message}")
            raise self.aborted
        self.moved.bytes += payload.numel()
        self.moved.blobs += kind == BLOB
        if kind != BLOB or payload.numel() != size:
            raise CorruptCheckpoint(
                f"rank {self.link.peer} sent {payload.numel()} bytes for blob {digest} of {size}"
            )
        return digest, payload

    def get(self, digest: str, size: int) -> np.ndarray:
        """The raw bytes received for blob ``digest`` (a :data:`BlobSource`: the copy
        checks them)."""
        with self.lock:
            while digest not in self.held:
                if self.aborted is not None:  # every worker raises the sender's error
                    raise PeerAborted(str(self.aborted))
                if self.ended or self.next >= len(self.order):
                    raise CorruptCheckpoint(f"blob {digest} was not sent by rank {self.link.peer}")
                got, payload = self._one()
                self.held[got] = payload
            payload = self.held.pop(digest)
        return payload.numpy()

    def drain(self) -> None:
        """Read (and drop) whatever the sender still sends; no blob is handed out after."""
        with self.lock:
            self.held.clear()
            while not self.ended and self.next < len(self.order):
                try:
                    self._one()
                except CorruptCheckpoint:
                    continue  # a wrong size is still a frame received
                except PeerAborted:
                    break
            self.ended = True


#: Puts a blob this host already holds elsewhere into the destination: ``(digest, raw
#: size) -> whether it did``.
Local = Callable[[str, int], bool]


def receive(
    link: Link, dst: Repo, branch: str, local: Local | None = None
) -> tuple[Version | None, Moved]:
    """The receiver's side: publish the peer's version on ``branch`` of ``dst`` (its
    manifest's step, metrics and meta), or None when the peer had nothing to send.
    Blobs ``dst`` lacks that ``local`` can place are not asked for."""
    doc_json = link.recv_json()
    if doc_json is None:
        return None, Moved()
    linked = 0
    try:
        doc = Manifest.parse(json.dumps(doc_json).encode(), f"the manifest from rank {link.peer}")
        blobs = blobs_of(doc)
        lack = []
        for digest, blob in blobs.items():
            if dst.store.stat(blob_key(digest)) is not None:
                continue
            if local is not None and local(digest, blob.size):
                linked += 1
                continue
            lack.append(digest)
    except BaseException as e:
        link.abort(e)
        raise
    link.send_json(lack)
    inbox = _Inbox(link, [(d, blobs[d].size) for d in lack])
    try:
        version = copy_version(inbox.get, doc, dst, branch, origin=f"rank {link.peer}")
    except RanksUnreachable:
        raise  # the peer stopped answering: nothing more will come
    except BaseException:
        inbox.drain()
        raise
    inbox.drain()
    inbox.moved.linked = linked
    return version, inbox.moved
