"""The invariants, checked between steps: I1-I4 on the repository, I5 and ``error`` as
the actors report them."""

from __future__ import annotations

from typing import Any

from cloudckpt import errors
from cloudckpt.blobs import blob_key, iter_chunks
from cloudckpt.repo import Repo

from .model import OPTIONS, Attempt, Records, Violation, same_state, short


class Checker:
    """Checks the invariants between steps, reading through an unwrapped handle."""

    def __init__(self, uri: str, records: Records) -> None:
        self.repo = Repo(uri, options=OPTIONS)
        self.records = records
        self.violations: list[Violation] = []
        self._subjects: set[tuple[str, str]] = set()
        self.parents: dict[str, str | None] = {}
        self.writers: dict[str, str] = {}
        self.heads: dict[str, str] = {}
        #: Attempt token -> index of the step after which its version was first in the
        #: index: when the commit took effect (the checker runs after every write).
        self.visible: dict[str, int] = {}
        self._failures = 0
        self._last: tuple[Any, ...] = ()
        self._blobs_of: dict[str, set[str]] = {}
        self._loaded: dict[str, tuple[Any, ...]] = {}

    def add(self, invariant: str, step: int, subject: str, message: str) -> None:
        if (invariant, subject) not in self._subjects:
            self._subjects.add((invariant, subject))
            self.violations.append(Violation(invariant, step, subject, message))

    def check(self, step: int, deep: bool, writes: int | None = None) -> None:
        """All invariants at this step (``deep``: also load and verify acked versions).

        With ``writes`` (the count of writes so far), a check is skipped when neither the
        store nor any record changed since the last one: it would find the same."""
        if writes is not None:
            seen = (
                writes,
                tuple(a.status for a in self.records.attempts.values()),
                len(self.records.acquisitions),
                len(self.records.deleting),
                len(self.records.failures),
            )
            if seen == self._last:
                return
            self._last = seen
        for inv, actor, message, at in self.records.failures[self._failures :]:
            self.add(inv, at, f"{actor}:{message[:60]}", f"{actor}: {message}")
        self._failures = len(self.records.failures)
        try:
            index = self.repo.index()
        except errors.CloudCkptError as e:
            self.add("I1", step, "index", f"versions.json unreadable: {short(e)}")
            return
        for vid, row in index.versions.items():
            self.parents.setdefault(vid, row.parent)
            self.writers.setdefault(vid, str(row.meta.get("writer", "")))
        self._acknowledged(index, step, deep)
        self._forward(index, step)
        self._fencing(index, step)
        self._restores(index, step)

    # I1
    def _acknowledged(self, index: Any, step: int, deep: bool) -> None:
        listing: dict[str, Any] | None = None
        for a in self.records.attempts.values():
            if a.status != "acked" or a.vid is None or a.vid in self.records.deleting:
                continue
            where = f"{a.vid} ({a.token})"
            if a.vid not in index.versions:
                self.add("I1", step, a.vid, f"acknowledged version {where} is not in the index")
                continue
            try:
                doc = self.repo.manifest(a.vid)
            except errors.CloudCkptError as e:
                self.add("I1", step, a.vid, f"manifest of {where}: {short(e)}")
                continue
            if listing is None:
                listing = self.repo.store.list_info("")
            needed = self._blobs_of.setdefault(a.vid, _blob_keys(doc))
            missing = needed - listing.keys()
            if missing:
                self.add("I1", step, a.vid, f"{where} lost blobs {sorted(missing)[:2]}")
                continue
            if deep:
                # Loading reads only these objects: while none changed, it finds the same.
                reads = sorted(needed | {k for k in listing if a.vid in k})
                seen = tuple((k, listing[k].size, listing[k].modified) for k in reads)
                if self._loaded.get(a.vid) != seen:
                    self._loads(a, step, where)
                    self._loaded[a.vid] = seen

    def _loads(self, a: Attempt, step: int, where: str) -> None:
        assert a.vid is not None
        try:
            loaded = self.repo.load(a.vid)
            report = self.repo.verify(a.vid)
        except errors.CloudCkptError as e:
            self.add("I1", step, a.vid, f"{where} does not load: {short(e)}")
            return
        if not same_state(loaded, a.state):
            self.add("I1", step, a.vid, f"{where} loads, but not the state committed")
        if not report.ok:
            self.add("I1", step, a.vid, f"{where} fails verify: {report.problems}")

    # I2
    def _forward(self, index: Any, step: int) -> None:
        for branch, old in self.heads.items():
            new = index.branches.get(branch)
            if new is None:
                self.add("I2", step, branch, f"branch {branch} lost its head {old}")
            elif new != old and not self._descends(new, old):
                self.add(
                    "I2",
                    step,
                    branch,
                    f"head of {branch} moved from {old} ({self.writers.get(old)}) to {new} "
                    f"({self.writers.get(new)}), not a descendant",
                )
        self.heads = dict(index.branches)

    def _descends(self, vid: str | None, ancestor: str) -> bool:
        for _ in range(len(self.parents) + 1):
            if vid is None:
                return False
            if vid == ancestor:
                return True
            vid = self.parents.get(vid)
        return False

    # I3
    def _fencing(self, index: Any, step: int) -> None:
        acqs = self.records.acquisitions
        for old in acqs:
            for new in acqs:
                if new.branch != old.branch or new.actor == old.actor or new.step <= old.step:
                    continue
                for a in self.records.attempts.values():
                    took = self.visible.get(a.token, -1)
                    if a.actor == old.actor and a.status == "acked" and took > new.step:
                        self.add(
                            "I3",
                            step,
                            f"{a.token}>{new.actor}",
                            f"{a.token} of {old.actor} took effect at step {took}, after "
                            f"{new.actor} took the lease of {new.branch} at step {new.step}",
                        )
                for vid in index.versions:
                    if self.writers.get(vid) == old.actor:
                        self._descends_from(vid, old.actor, new.actor, step)

    def _descends_from(self, vid: str, old: str, new: str, step: int) -> None:
        current = self.parents.get(vid)
        for _ in range(len(self.parents) + 1):
            if current is None:
                return
            if self.writers.get(current) == new:
                self.add(
                    "I3",
                    step,
                    f"{vid}<{new}",
                    f"version {vid} of superseded holder {old} descends from {current} of {new}",
                )
                return
            current = self.parents.get(current)

    # I4
    def _restores(self, index: Any, step: int) -> None:
        attempts = self.records.attempts
        for vid, row in index.versions.items():
            token = row.meta.get("attempt")
            attempt = attempts.get(token) if isinstance(token, str) else None
            if attempt is None:
                self.add("I4", step, vid, f"{vid} is in the index but no actor committed it")
                continue
            self.visible.setdefault(attempt.token, step - 1)
        for token, first in self.visible.items():
            a = attempts[token]
            if a.status in ("rejected", "error"):
                self.add(
                    "I4",
                    step,
                    token,
                    f"commit {token} raised ({a.error}) but was in the index after step {first}",
                )


def _blob_keys(doc: Any) -> set[str]:
    digests = getattr(doc, "digests", None)
    if callable(digests):
        return {blob_key(d) for d in digests()}
    return {blob_key(c.digest) for entry in doc["tensors"] for c in iter_chunks(entry)}
