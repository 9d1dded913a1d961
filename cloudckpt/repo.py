"""The checkpoint repository at a URI: commit a state, load it back.

Layout under the root URI (format 2)::

    versions.json              branches, tags, one row per version, fencing tokens, gc
                               epoch and sweeps (compare-and-swap)
    manifests/<version>.json   immutable: the state's skeleton and each array's chunks
    blobs/<hh>/<hash>          immutable compressed chunks, named by their content hash
    published/<version>        the commit was acknowledged (read by repair)
    leases/<branch>.json       the branch's writer lease

A commit uploads missing blobs, writes the manifest (create-if-absent), then swaps
``versions.json``; the version exists only once that swap succeeds
(:mod:`cloudckpt.commit`; docs/protocol.md has the whole protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cloudckpt import fallback, integrity, manifest, refs, schema, tree, versions
from cloudckpt.blobs import BlobReader, BlobWriter, TransferOptions, TransferStats
from cloudckpt.blobs.cache import BlobCache, CacheOptions
from cloudckpt.commit import CommitRequest, Transaction, new_version_id
from cloudckpt.errors import CheckpointNotFound, CommitConflict
from cloudckpt.gc import ABANDONED_AFTER, DEFAULT_GRACE, GCReport, collect
from cloudckpt.integrity import VerifyReport
from cloudckpt.manifest import Manifest
from cloudckpt.refs import LATEST
from cloudckpt.store import Store, StoreOptions
from cloudckpt.versions import Index, Version

if TYPE_CHECKING:  # the tensor code is imported by the methods that touch tensors
    from cloudckpt.diff import Diff

__all__ = ["LATEST", "Repo", "RepoOptions", "new_version_id"]

log = logging.getLogger("cloudckpt")
T = TypeVar("T")


#: Fills arrays from their manifest entries: ``[(entry, destination), ...] -> stats``.
Fetch = Callable[[list[tuple[dict[str, Any], Any]]], TransferStats]


@dataclass(frozen=True)
class RepoOptions:
    """Options of a repository handle: transfer tuning and store behaviour."""

    transfer: TransferOptions = field(default_factory=TransferOptions)
    store: StoreOptions = field(default_factory=StoreOptions)
    #: A blob cache on this host: loads read what it holds instead of the store.
    cache: CacheOptions | None = None


class Repo:
    """The checkpoint repository at ``uri`` (``s3://``, ``gs://``, ``file://``, ``memory://``...).

    ``storage_options`` go to fsspec unchanged (for S3: ``endpoint_url``, ``key``,
    ``secret``...). Nothing is read or written until the first call.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        options: RepoOptions | None = None,
    ) -> None:
        self.options = options or RepoOptions()
        self.store = Store(uri, storage_options, self.options.store)
        self.cache = BlobCache(self.options.cache) if self.options.cache else None
        self.uri = self.store.uri
        self.last_stats: TransferStats | None = None

    def __repr__(self) -> str:
        return f"Repo({self.uri!r})"

    # -- reading the index ---------------------------------------------------------
    def index(self) -> Index:
        return versions.read(self.store)[0]

    def versions(self) -> list[Version]:
        """All versions, oldest first."""
        return list(self.index().versions.values())

    def branches(self) -> dict[str, str]:
        """Branch name -> head version id."""
        return dict(self.index().branches)

    def resolve(self, ref: str = "main", index: Index | None = None) -> Version:
        """The version a ref names: a branch, a tag, a version id, or ``"latest"``."""
        index = index or self.index()
        if ref == LATEST:
            found = index.latest()
        else:
            vid = index.branches.get(ref) or index.tags.get(ref) or ref
            found = index.versions.get(vid)
        if found is None:
            known = ", ".join(sorted(index.branches)) or "none yet"
            raise CheckpointNotFound(
                f"{self.uri}: no branch, tag or version named {ref!r} (branches: {known})"
            )
        return found

    def rev_parse(self, ref: str, index: Index | None = None) -> Version:
        """The version a ref names as a person types it, like ``git rev-parse``: what
        :meth:`resolve` takes, a unique abbreviation of a version id, and ``REF~N`` /
        ``REF^`` for an ancestor (see :func:`cloudckpt.refs.rev_parse`)."""
        index = index or self.index()
        return refs.rev_parse(index, ref, lambda exact: self.resolve(exact, index), self.uri)

    def newest_good(
        self, ref: str, attempt: Callable[[Version], T], index: Index | None = None
    ) -> tuple[Version, T, dict[str, str]]:
        """Restore's fallback: the newest version of ``ref``'s lineage for which
        ``attempt(version)`` does not raise CorruptCheckpoint (one that does not verify or
        does not fit is passed over for its parent, and logged), what ``attempt``
        returned, and version id -> why for each version passed over."""
        index = index or self.index()
        head = self.resolve(ref, index)
        kind = "branch" if ref in index.branches else "tag" if ref in index.tags else "version"
        where = f"{self.uri} {kind} {ref!r}"
        return fallback.first_good(versions.lineage(index, head.id), attempt, where)

    def manifest(self, ref: str | Version = "main") -> Manifest:
        """The parsed manifest of a version (a ref, or a Version already resolved)."""
        version = ref if isinstance(ref, Version) else self.resolve(ref)
        return manifest.read(self.store, version.id, expected=version)

    # -- commit ----------------------------------------------------------------------
    def commit(
        self,
        state: Any,
        *,
        branch: str = "main",
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        message: str | None = None,
        meta: Mapping[str, Any] | None = None,
        fast_forward: bool = False,
        fence: int | None = None,
    ) -> Version:
        """Store ``state`` as a new version at the head of ``branch``.

        ``meta`` is recorded with the version (JSON-serializable: why it was saved,
        recovery actions, timings). ``fence`` is the writer lease's fencing token
        (:attr:`cloudckpt.lease.WriterLease.fence`).

        Raises UnsupportedState (before any upload) if the state holds an object that
        cannot be stored without pickle; CommitConflict if another writer moved the
        branch meanwhile -- unless ``fast_forward``, which commits on top of the new
        head; FencedOut if the writer lease passed to another job meanwhile.
        """
        skeleton, leaves = tree.flatten(state)
        request = CommitRequest(
            branch, step, dict(metrics or {}), message, dict(meta or {}), fast_forward, fence
        )
        txn = Transaction(self.store, self.options.transfer, request, cache=self.cache).begin()
        entries, stats = txn.writer().write(leaves)

        def restore(missing: set[str]) -> None:
            known = {d: n for d, n in txn.known.items() if d not in missing}
            BlobWriter(self.store, self.options.transfer, known, self.cache).write(leaves)

        version = txn.publish(skeleton, entries, stats, restore=restore)
        self.last_stats = stats
        log.debug(
            "committed %s on %s: %d arrays, %.1f MB logical, %.1f MB stored, %.1f MB uploaded "
            "(%d new blobs, %d reused) in %.2fs",
            version.id,
            branch,
            len(entries),
            stats.logical_bytes / 1e6,
            stats.stored_bytes / 1e6,
            stats.transferred_bytes / 1e6,
            stats.transferred_blobs,
            stats.reused_blobs,
            stats.seconds,
        )
        return version

    # -- branches, tags, history --------------------------------------------------------
    def branch(self, name: str, from_ref: str = "main") -> Version:
        """Create branch ``name`` whose head is the version ``from_ref`` names. Its first
        commit's parent is that version; the two branches share all unchanged blobs."""
        index = self.index()
        target = self.resolve(from_ref, index)
        _check_name(name, "branch", index)

        def create(ix: Index) -> bool:
            if ix.branches.get(name, target.id) != target.id or name in index.branches:
                raise CommitConflict(f"{self.uri}: branch {name!r} already exists")
            _check_live(self.uri, ix, target.id)
            if name in ix.branches:
                return False  # created by an earlier attempt whose response was lost
            ix.branches[name] = target.id
            return True

        versions.update(self.store, create)
        return target

    def tag(self, name: str, ref: str = "main") -> Version:
        """Name the version ``ref`` names; a tag never moves once set."""
        index = self.index()
        target = self.resolve(ref, index)
        _check_name(name, "tag", index)

        def create(ix: Index) -> None:
            if ix.tags.get(name, target.id) != target.id:
                raise CommitConflict(f"{self.uri}: tag {name!r} already names {ix.tags[name]}")
            _check_live(self.uri, ix, target.id)
            ix.tags[name] = target.id

        versions.update(self.store, create)
        return target

    def tags(self) -> dict[str, str]:
        """Tag name -> version id."""
        return dict(self.index().tags)

    def log(self, ref: str = "main") -> list[Version]:
        """The lineage of ``ref``, newest first, following parents across branch points
        (a deleted ancestor ends the walk)."""
        index = self.index()
        return list(versions.lineage(index, self.resolve(ref, index).id))

    def diff(self, a: str, b: str = "main", norms: bool = True) -> Diff:
        """Arrays added, removed and changed from ``a`` to ``b`` (see :mod:`cloudckpt.diff`)."""
        from cloudckpt.diff import diff_versions

        return diff_versions(self, a, b, norms=norms)

    # -- integrity ---------------------------------------------------------------------
    def verify(self, ref: str = "main") -> VerifyReport:
        """Download, decompress and hash every chunk of a version; report each bad one."""
        return integrity.verify(self.store, self.options.transfer, self.resolve(ref))

    def repair(self) -> Index:
        """Bring back the published versions ``versions.json`` lost (see
        :func:`cloudckpt.integrity.repair`); safe while others commit."""
        return integrity.repair(self.store)

    # -- single files --------------------------------------------------------------------
    def export(self, ref: str, destination: str, **kwargs: Any) -> dict[str, str]:
        """Write a version as one safetensors or torch file (see :func:`single_file.export`)."""
        from cloudckpt import single_file

        return single_file.export(self, ref, destination, **kwargs)

    def import_file(self, source: str, **kwargs: Any) -> Version:
        """Commit an existing safetensors or weights-only torch file as a new version."""
        from cloudckpt import single_file

        return single_file.import_file(self, source, **kwargs)

    # -- deleting ----------------------------------------------------------------------
    def delete(
        self, refs: Iterable[str], *, fence: int | None = None, branch: str = "main"
    ) -> list[str]:
        """Remove versions from the index; their data goes at the next :meth:`gc` after
        the grace period. A branch head or a tagged version cannot be deleted.

        With ``fence`` (a writer lease's token on ``branch``), the deletion is refused
        with FencedOut if the lease passed to another job: a job that lost its branch
        must not prune the new owner's versions."""
        index = self.index()
        ids = [self.resolve(ref, index).id for ref in refs]

        def drop(ix: Index) -> None:
            versions.check_fence(ix, branch, fence, self.uri, "nothing deleted")
            pinned = {*ix.branches.values(), *ix.tags.values()}
            for vid in ids:
                if vid in pinned:
                    raise CommitConflict(
                        f"{self.uri}: version {vid} is a branch head or tagged; move or "
                        "delete the branch/tag first"
                    )
                row = ix.versions.pop(vid, None)
                if row is not None:
                    ix.deleted[vid] = None  # stamped by the store's clock at the next gc
                    ix.prune(row)  # log and plot keep its lineage and metrics

        versions.update(self.store, drop)
        log.info("deleted %d versions from %s", len(ids), self.uri)
        return ids

    def gc(
        self,
        grace: float = DEFAULT_GRACE,
        dry_run: bool = False,
        abandoned_after: float = ABANDONED_AFTER,
    ) -> GCReport:
        """Sweep manifests and blobs no live version reaches (see :mod:`cloudckpt.gc`);
        safe with commits, repair and other collections running at once, for any grace.
        Incomplete uploads and temporary files go once older than ``abandoned_after``."""
        return collect(self.store, grace, dry_run, abandoned_after=abandoned_after)

    def _reader(self) -> BlobReader:
        return BlobReader(self.store, self.options.transfer, self.cache)

    # -- load ------------------------------------------------------------------------
    def load(
        self,
        ref: str | Version = "main",
        *,
        keys: Iterable[str] | None = None,
        into: Any = None,
        fetch: Fetch | None = None,
    ) -> Any:
        """Load a version's state (a ref, or a Version already resolved): tensors on the
        CPU, exactly as committed.

        ``keys``: only the entries whose path (dot-joined, e.g. ``"model.fc.weight"``)
        matches one of these names or glob patterns (``"model"`` or ``"model.*"``);
        only their chunks are fetched.

        ``into``: an object with ``state_dict()``/``load_state_dict()`` holding the whole
        state, or a mapping from top-level key to such objects (``{"model": model,
        "optimizer": opt}``). Tensors are decoded straight into the existing tensors of
        matching shape and dtype, then ``load_state_dict`` is called, so no second full
        copy of the state is held. If the load fails (a blob fails its hash, the store
        fails), those tensors may hold part of the new data: load a version into them
        again (``CheckpointManager.restore`` does, falling back to the parent) before
        using them. Missing blobs and malformed manifests are found before anything is
        written.

        ``fetch``: fills the allocated arrays from their manifest entries (default: every
        chunk from the store); the multi-rank loader downloads a share and broadcasts.
        """
        from cloudckpt import load_into

        version = ref if isinstance(ref, Version) else self.resolve(ref)
        doc = self.manifest(version)
        skeleton = doc.state
        if keys is not None:
            patterns = list(keys)
            skeleton = tree.select(skeleton, lambda p: load_into.matches(p, patterns))
            if skeleton is None:
                raise CheckpointNotFound(
                    f"{self.uri}: nothing in version {version.id} matches keys {patterns}"
                )
        destinations = load_into.destinations(into)
        entries = doc.tensors
        # Which arrays this load needs, and whether the store holds what their entries
        # claim, before anything is allocated (one HEAD per blob).
        used: dict[int, None] = {}
        tree.unflatten(skeleton, lambda index, path: used.setdefault(index))
        self._reader().check_sizes([entries[i] for i in used])
        arrays: dict[int, Any] = {}
        targets: list[tuple[dict[str, Any], Any]] = []

        def array(index: int, path: str) -> Any:
            if index not in arrays:
                entry = entries[index]  # in range: the manifest's skeleton was checked
                dest = load_into.allocate(entry, destinations.get(entry.get("path", path)))
                arrays[index] = dest
                targets.append((entry, dest))
            return arrays[index]

        state = tree.unflatten(skeleton, array)
        self.last_stats = (fetch or self._reader().read)(targets)
        log.info(
            "loaded %s: %d arrays, %.1f MB in %.2fs",
            version.id,
            len(targets),
            self.last_stats.logical_bytes / 1e6,
            self.last_stats.seconds,
        )
        load_into.apply(into, state, f"{self.uri} version {version.id}")
        return state


def _check_name(name: str, kind: str, index: Index) -> None:
    schema.new_name(name)
    if name == LATEST or name in index.versions:
        raise ValueError(f"{name!r} cannot name a {kind}: it is reserved or a version id")
    shadowed = refs.abbreviates(index, name)
    if shadowed:
        raise ValueError(
            f"{name!r} cannot name a {kind}: it abbreviates version {shadowed} (a ref like "
            f"{name!r} would mean the {kind} instead of that version)"
        )


def _check_live(uri: str, index: Index, vid: str) -> None:
    if vid not in index.versions:
        raise CommitConflict(f"{uri}: version {vid} was deleted meanwhile; nothing was named")
