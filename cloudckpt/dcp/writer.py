"""``CloudStorageWriter``: one ``dcp.save`` committed as one version."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import SavePlan, SavePlanner, StorageWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from cloudckpt import tree
from cloudckpt.blobs import TransferStats, iter_chunks
from cloudckpt.commit import CommitRequest, Start, Transaction
from cloudckpt.dcp import layout
from cloudckpt.errors import UnsupportedState
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.versions import Version


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
        self._storage_options, self._options = storage_options, options
        self.repo = Repo(uri, storage_options, options=options)
        self.fence = fence
        self.branch, self.step, self.metrics = branch, step, dict(metrics or {})
        self.message, self.meta = message, dict(meta or {})
        self.version: Version | None = None
        self._txn: Transaction | None = None

    @property
    def checkpoint_id(self) -> str:
        """The URI of the repository this writer commits to."""
        return self.repo.uri

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save; a ``checkpoint_id`` (a repository URI) retargets the writer."""
        self.version = None
        self._txn = None
        self.repo = layout.retarget(self.repo, checkpoint_id, self._storage_options, self._options)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives") is False and _several_ranks():
            # Without collectives DCP has every rank publish on its own: each would commit
            # a version holding its own shards only.
            raise UnsupportedState(
                "CloudStorageWriter commits one version per save, published by the "
                "coordinator once every rank has uploaded; dcp.save(use_collectives=False) "
                "has no coordinator. Save with collectives (the default)"
            )
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator begins the commit before any rank uploads (the publish knows
        # when the uploads started). The plans are passed on untouched: with
        # enable_plan_caching DCP replaces an unchanged plan by its cached copy, so
        # nothing of one save may travel in them.
        self._txn = self._transaction().begin()
        return plans

    def _transaction(self) -> Transaction:
        request = CommitRequest(
            branch=self.branch,
            step=self.step,
            metrics=self.metrics,
            message=self.message,
            meta={"dcp": True, **self.meta},
            fence=self.fence,
        )
        return Transaction(
            self.repo.store, self.repo.options.transfer, request, cache=self.repo.cache
        )

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        # Another rank than the coordinator begins on its own and reports what it read;
        # the publish then checks for garbage collections since the earliest start.
        txn = self._txn or self._transaction().begin()
        start = txn.start.to_json()  # type: ignore[union-attr]
        leaves: list[tree.Leaf] = []
        results: list[WriteResult] = []
        tensor_items = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                stored = layout.object_skeleton(
                    item.index.fqn, lambda i=item: planner.resolve_data(i)
                )
                results.append(WriteResult(item.index, 0, {"object": stored, "start": start}))
                continue
            tensor = planner.resolve_data(item).detach().cpu()
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            dtype = str(tensor.dtype).removeprefix("torch.")
            tree.torch_dtype(dtype)  # refuse what cannot be stored, before uploading
            leaf = tree.Leaf(layout.key(item.index), "torch", dtype, tuple(tensor.shape), tensor)
            leaves.append(leaf)
            tensor_items.append(item)
        entries, stats = txn.writer().write(leaves)
        for i, (item, entry) in enumerate(zip(tensor_items, entries, strict=True)):
            extra = {"uploaded": stats.transferred_bytes} if i == 0 else {}
            data = {"entry": entry, "start": start, **extra}
            results.append(WriteResult(item.index, leaves[i].nbytes, data))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self._txn is not None, "finish runs on the coordinator, after prepare_global_plan"
        names: list[str] = []
        entries: list[dict[str, Any]] = []
        items: list[dict[str, Any]] = []
        starts: list[Start] = [self._txn.start]  # type: ignore[list-item]
        stats = TransferStats()
        stored: dict[str, int] = {}
        #: The dtype each tensor was written in: DCP's metadata may come from a cached
        #: plan of an earlier save (its plan comparison ignores dtypes).
        dtypes: dict[str, str] = {}
        for rank_results in results:
            for wr in rank_results:
                data = wr.storage_data
                starts.append(Start.from_json(data["start"]))
                row: dict[str, Any] = {"fqn": wr.index.fqn, "offset": layout.offset(wr.index)}
                if "object" in data:
                    row["object"] = data["object"]
                else:
                    dtypes.setdefault(wr.index.fqn, data["entry"]["dtype"])
                    row["entry"] = len(entries)
                    names.append(layout.key(wr.index))
                    entries.append(data["entry"])
                    stats.logical_bytes += wr.size_in_bytes
                    stats.transferred_bytes += data.get("uploaded", 0)
                    stored.update({c.digest: c.stored for c in iter_chunks(data["entry"])})
                items.append(row)
        stats.stored_bytes = sum(stored.values())
        dcp_layout = {
            "version": metadata.version,
            "state_dict_metadata": {
                fqn: layout.describe(md, dtypes.get(fqn))
                for fqn, md in metadata.state_dict_metadata.items()
            },
            "planner_data": layout.jsonable(metadata.planner_data),
            "items": items,
        }
        # A rank that began elsewhere than the coordinator (another gc epoch, a sweep
        # running) makes the publish check that every blob is still there.
        same = all(s.gc_epoch == starts[0].gc_epoch and s.clean for s in starts)
        self._txn.start = dataclasses.replace(starts[0], clean=same)
        self.version = self._txn.publish(
            tree.flat_skeleton(names), entries, stats, extra={"dcp": dcp_layout}
        )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.repo.uri)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" in str(checkpoint_id)


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
