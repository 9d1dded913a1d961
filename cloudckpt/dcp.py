"""A ``torch.distributed.checkpoint`` storage backend: ``dcp.save`` / ``dcp.load`` /
``dcp.async_save`` of FSDP and DTensor state, stored as cloudckpt versions.

Each rank writes its own shards through the blob pipeline (compression, content
addressing, retries); the coordinator publishes one version whose manifest records
DCP's global layout as JSON. Loading with a different number of ranks reshards (DCP
plans which saved chunks each rank needs; each rank downloads only those). Non-tensor
values (learning rates, step counters) are stored in the manifest as JSON, never as
pickles, and are handed back to the planner without unpickling anything downloaded.

    writer = CloudStorageWriter("s3://bucket/run", branch="main", step=100)
    dcp.save(state_dict, storage_writer=writer)
    dcp.load(state_dict, storage_reader=CloudStorageReader("s3://bucket/run"))
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from cloudckpt import load_into, manifest, schema, tree
from cloudckpt.blobs import TransferStats, iter_chunks
from cloudckpt.commit import Start, Transaction
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint, UnsupportedState
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.versions import Version

__all__ = ["CloudStorageReader", "CloudStorageWriter"]


class CloudStorageWriter(StorageWriter):
    """Commits one ``dcp.save`` as a new version on ``branch`` of the repo at ``uri``.

    ``fence``: the coordinator's writer lease token (:attr:`WriterLease.fence`); the save
    is refused (FencedOut) if the lease passed to another job meanwhile.

    After the save, ``version`` (on the coordinator rank) is the committed version.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        branch: str = "main",
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        message: str | None = None,
        meta: Mapping[str, Any] | None = None,
        options: RepoOptions | None = None,
        fence: int | None = None,
    ) -> None:
        super().__init__()
        self.repo = Repo(uri, storage_options, options=options)
        self.fence = fence
        self.branch, self.step, self.metrics = branch, step, dict(metrics or {})
        self.message, self.meta = message, dict(meta or {})
        self.version: Version | None = None
        self._txn: Transaction | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.version = None
        self._txn = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator begins the commit before any rank uploads: every rank skips the
        # parent's blobs, and the publish knows when the uploads started.
        self._txn = self._transaction().begin()
        start = self._txn.start.to_json()  # type: ignore[union-attr]
        return [dataclasses.replace(p, storage_data=start) for p in plans]

    def _transaction(self) -> Transaction:
        return self.repo.transaction(
            branch=self.branch,
            step=self.step,
            metrics=self.metrics,
            message=self.message,
            meta={"dcp": True, **self.meta},
            fence=self.fence,
        )

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        txn = self._txn
        if txn is None:  # a rank other than the coordinator: the start came with the plan
            txn = self._transaction()
            txn.start = Start.from_json(plan.storage_data)
            txn.begin()
        leaves: list[tree.Leaf] = []
        results: list[WriteResult] = []
        tensor_items = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                results.append(WriteResult(item.index, 0, {"object": _object(planner, item)}))
                continue
            tensor = planner.resolve_data(item).detach().cpu()
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            dtype = str(tensor.dtype).removeprefix("torch.")
            tree.torch_dtype(dtype)  # refuse what cannot be stored, before uploading
            leaves.append(tree.Leaf(_key(item.index), "torch", dtype, tuple(tensor.shape), tensor))
            tensor_items.append(item)
        entries, stats = txn.writer().write(leaves)
        for i, (item, entry) in enumerate(zip(tensor_items, entries, strict=True)):
            extra = {"uploaded": stats.transferred_bytes} if i == 0 else {}
            results.append(WriteResult(item.index, leaves[i].nbytes, {"entry": entry, **extra}))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        names: list[str] = []
        entries: list[dict[str, Any]] = []
        items: list[dict[str, Any]] = []
        stats = TransferStats()
        stored: dict[str, int] = {}
        for rank_results in results:
            for wr in rank_results:
                data = wr.storage_data
                row: dict[str, Any] = {"fqn": wr.index.fqn, "offset": _offset(wr.index)}
                if "object" in data:
                    row["object"] = data["object"]
                else:
                    row["entry"] = len(entries)
                    names.append(_key(wr.index))
                    entries.append(data["entry"])
                    stats.logical_bytes += wr.size_in_bytes
                    stats.transferred_bytes += data.get("uploaded", 0)
                    stored.update({c.digest: c.stored for c in iter_chunks(data["entry"])})
                items.append(row)
        stats.stored_bytes = sum(stored.values())
        layout = {
            "version": metadata.version,
            "state_dict_metadata": {
                fqn: _describe(md) for fqn, md in metadata.state_dict_metadata.items()
            },
            "planner_data": _jsonable(metadata.planner_data),
            "items": items,
        }
        assert self._txn is not None, "finish runs on the coordinator, after prepare_global_plan"
        self.version = self._txn.publish(
            tree.flat_skeleton(names), entries, stats, extra={"dcp": layout}
        )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.repo.uri)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" in str(checkpoint_id)


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
        self.repo = Repo(uri, storage_options, options=options)
        self.ref = ref
        self.version: Version | None = None
        self._entries: list[dict[str, Any]] = []
        self._where: dict[MetadataIndex, dict[str, Any]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.version = self.repo.resolve(self.ref)
        doc = self.repo.manifest(self.version)
        layout = doc.extra.get("dcp")
        where = self.repo.store.url(manifest.key(self.version.id))
        if not isinstance(layout, dict):
            raise CheckpointNotFound(
                f"{where} was not saved with torch.distributed.checkpoint; load it with "
                "Repo.load or CheckpointManager.restore"
            )
        try:
            self._entries = doc.tensors
            state_md = {fqn: _parse_md(md) for fqn, md in layout["state_dict_metadata"].items()}
            self._where = {}
            for row in layout["items"]:
                index = MetadataIndex(str(row["fqn"]), _size(row["offset"]))
                if "object" in row:
                    self._where[index] = {"object": row["object"]}
                else:
                    entry = schema.integer(row["entry"], 0, len(self._entries) - 1)
                    self._where[index] = {"entry": self._entries[entry]}
            planner_data = _tuples(layout.get("planner_data"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise CorruptCheckpoint(f"{where}: malformed DCP layout ({e})") from None
        return Metadata(
            state_md,
            planner_data=planner_data,
            storage_data=self._where,
            version=layout.get("version"),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._where = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        needed: dict[int, tuple[dict[str, Any], Any]] = {}
        for req in plan.items:
            if req.type != LoadItemType.BYTE_IO:
                entry = self._stored(req.storage_index)["entry"]
                if id(entry) not in needed:
                    needed[id(entry)] = (entry, load_into.allocate(entry, None))
        # Only the saved chunks this rank's plan needs, fetched in parallel.
        self.repo.reader().read(list(needed.values()))
        for req in plan.items:
            stored = self._stored(req.storage_index)
            if req.type == LoadItemType.BYTE_IO:
                _deliver_object(planner, req, stored["object"])
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
            raise CorruptCheckpoint(f"the DCP layout has no item {index.fqn!r}") from None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" in str(checkpoint_id)


# -- JSON for DCP's metadata (no pickles) ------------------------------------------------
def _key(index: MetadataIndex) -> str:
    offset = _offset(index)
    return index.fqn if offset is None else f"{index.fqn}@{','.join(map(str, offset))}"


def _offset(index: MetadataIndex) -> list[int] | None:
    return None if index.offset is None else [int(x) for x in index.offset]


def _size(value: Any) -> torch.Size | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, int) and x >= 0 for x in value):
        raise ValueError(f"bad offsets or sizes {value!r}")
    return torch.Size(value)


def _describe(md: Any) -> dict[str, Any]:
    if isinstance(md, BytesStorageMetadata):
        return {"bytes": True}
    props = md.properties
    return {
        "dtype": str(props.dtype).removeprefix("torch."),
        "requires_grad": bool(props.requires_grad),
        "size": [int(x) for x in md.size],
        "chunks": [[[int(x) for x in c.offsets], [int(x) for x in c.sizes]] for c in md.chunks],
    }


def _parse_md(doc: dict[str, Any]) -> Any:
    if doc.get("bytes"):
        return BytesStorageMetadata()
    props = TensorProperties(
        dtype=tree.torch_dtype(doc["dtype"]), requires_grad=bool(doc.get("requires_grad", False))
    )
    chunks = [ChunkStorageMetadata(_size(o), _size(s)) for o, s in doc["chunks"]]
    return TensorStorageMetadata(props, _size(doc["size"]), chunks)  # type: ignore[arg-type]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise UnsupportedState(f"DCP planner data holds a {type(value).__name__}")


def _tuples(value: Any) -> Any:
    """DCP's planner data maps flattened keys to paths, which it expects as tuples."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _object(planner: SavePlanner, item: Any) -> Any:
    lookup = getattr(planner, "lookup_object", None)
    if lookup is None:
        raise UnsupportedState(
            f"{item.index.fqn}: non-tensor values need a planner with lookup_object "
            "(DCP's DefaultSavePlanner has one)"
        )
    skeleton, leaves = tree.flatten(lookup(item.index))
    if leaves:
        raise UnsupportedState(f"{item.index.fqn}: a non-tensor value holds tensors")
    return skeleton


def _deliver_object(planner: LoadPlanner, req: Any, skeleton: Any) -> None:
    def no_arrays(index: int, path: str) -> Any:
        raise CorruptCheckpoint(f"{req.storage_index.fqn}: a stored value refers to arrays")

    value = tree.unflatten(skeleton, no_arrays)
    if isinstance(planner, DefaultLoadPlanner):  # what its load_bytes does, minus pickle
        fqn = req.dest_index.fqn
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[fqn], value)
        else:
            planner.state_dict[fqn] = value
        return
    # Another planner expects torch.save bytes: of the plain value just decoded from JSON.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    planner.load_bytes(req, buffer)
