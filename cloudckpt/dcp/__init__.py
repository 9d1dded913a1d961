"""A ``torch.distributed.checkpoint`` storage backend: ``dcp.save`` / ``dcp.load`` /
``dcp.async_save`` of FSDP and DTensor state, stored as cloudckpt versions.

Each rank writes its own shards through the blob pipeline (compression, content
addressing, retries); the coordinator publishes one version whose manifest records
DCP's global layout as JSON. Loading with a different number of ranks reshards (DCP
plans which saved chunks each rank needs; each rank downloads only those). Non-tensor
values (learning rates, step counters) are stored in the manifest as JSON, never as
pickles; a planner's own ``transform_object`` and ``load_bytes`` see them as DCP defines,
through streams made in this process (DCP's default planner unpickles nothing).

    writer = CloudStorageWriter("s3://bucket/run", branch="main", step=100)
    dcp.save(state_dict, storage_writer=writer)
    dcp.load(state_dict, storage_reader=CloudStorageReader("s3://bucket/run"))

A ``checkpoint_id`` passed to ``dcp.save``/``dcp.load`` with one of these is the URI of
the repository to use instead of the one given at construction.
"""

from cloudckpt.dcp.reader import CloudStorageReader
from cloudckpt.dcp.writer import CloudStorageWriter

__all__ = ["CloudStorageReader", "CloudStorageWriter"]
