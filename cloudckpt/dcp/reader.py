"""``CloudStorageReader``: ``dcp.load`` of a version, each rank fetching only its chunks."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch.distributed.checkpoint import LoadPlan, LoadPlanner, StorageReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from cloudckpt import load_into, manifest, schema
from cloudckpt.blobs import BlobReader
from cloudckpt.dcp import layout
from cloudckpt.errors import CheckpointNotFound, CommitConflict, CorruptCheckpoint
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.versions import Version


class CloudStorageReader(StorageReader):
    """Reads the version ``ref`` names (a branch, tag or version id) for ``dcp.load``."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        ref: str = "main",
        options: RepoOptions | None = None,
    ) -> None:
        super().__init__()
        self._storage_options, self._options = storage_options, options
        self.repo = Repo(uri, storage_options, options=options)
        self.ref = ref
        self.version: Version | None = None
        self._entries: list[dict[str, Any]] = []
        self._where: dict[MetadataIndex, dict[str, Any]] = {}
        #: This rank's metadata was of another version than the coordinator's.
        self._moved = False

    @property
    def checkpoint_id(self) -> str:
        """The URI of the repository this reader loads from."""
        return self.repo.uri

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load; a ``checkpoint_id`` (a repository URI) retargets the reader."""
        self.version = None
        self._moved = False
        self.repo = layout.retarget(self.repo, checkpoint_id, self._storage_options, self._options)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._read_layout(self.repo.resolve(self.ref))

    def _read_layout(self, version: Version) -> Metadata:
        self.version = version
        doc = self.repo.manifest(version)
        found = doc.extra.get("dcp")
        where = self.repo.store.url(manifest.key(version.id))
        if not isinstance(found, dict):
            raise CheckpointNotFound(
                f"{where} was not saved with torch.distributed.checkpoint; load it with "
                "Repo.load or CheckpointManager.restore"
            )
        try:
            self._entries = doc.tensors
            state_md = {fqn: layout.parse(md) for fqn, md in found["state_dict_metadata"].items()}
            self._where = {}
            for row in found["items"]:
                index = MetadataIndex(str(row["fqn"]), layout.size(row["offset"]))
                if "object" in row:
                    self._where[index] = {"object": row["object"]}
                else:
                    entry = schema.integer(row["entry"], 0, len(self._entries) - 1)
                    self._where[index] = {"entry": self._entries[entry]}
            planner_data = layout.tuples(found.get("planner_data"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise CorruptCheckpoint(f"{where}: malformed DCP layout ({e})") from None
        return Metadata(
            state_md,
            planner_data=planner_data,
            storage_data=self._where,
            version=found.get("version"),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._where = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        # Each rank resolved the ref on its own: every rank reads the coordinator's version,
        # so a save landing meanwhile cannot mix two versions in one load.
        pinned = self.version.id if self.version is not None else None
        return [dataclasses.replace(p, storage_data=pinned) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        pinned = plan.storage_data
        if isinstance(pinned, str) and self.version is not None and pinned != self.version.id:
            self._read_layout(self.repo.resolve(pinned))
            self._moved = True
        needed: dict[int, tuple[dict[str, Any], Any]] = {}
        for req in plan.items:
            if req.type != LoadItemType.BYTE_IO:
                entry = self._stored(req.storage_index)["entry"]
                if id(entry) not in needed:
                    needed[id(entry)] = (entry, load_into.allocate(entry, None))
        # Only the saved chunks this rank's plan needs, fetched in parallel.
        reader = BlobReader(self.repo.store, self.repo.options.transfer, self.repo.cache)
        reader.read(list(needed.values()))
        for req in plan.items:
            stored = self._stored(req.storage_index)
            if req.type == LoadItemType.BYTE_IO:
                layout.deliver_object(planner, req, stored["object"])
                continue
            saved = needed[id(stored["entry"])][1]
            for dim, (start, length) in enumerate(
                zip(req.storage_offsets, req.lengths, strict=True)
            ):
                saved = saved.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            if target.size() != saved.size():
                raise CorruptCheckpoint(
                    f"{req.storage_index.fqn}: stored chunk {tuple(saved.size())} does not fit "
                    f"the requested {tuple(target.size())}"
                )
            target.copy_(saved)
            planner.commit_tensor(req, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _stored(self, index: MetadataIndex) -> dict[str, Any]:
        try:
            return self._where[MetadataIndex(index.fqn, index.offset)]
        except KeyError:
            if self._moved:
                raise CommitConflict(
                    f"{self.repo.uri}: {self.ref!r} moved while the ranks were loading it, to a "
                    f"version laid out otherwise ({index.fqn!r}); load a version id "
                    "(CloudStorageReader(ref=...)) to load while saves land"
                ) from None
            raise CorruptCheckpoint(f"the DCP layout has no item {index.fqn!r}") from None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" in str(checkpoint_id)
