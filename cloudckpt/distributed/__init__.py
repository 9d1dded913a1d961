"""Several ranks of one job (torch.distributed): replicated state through
:class:`~cloudckpt.CheckpointManager` or :mod:`.replicated`, sharded state through
:mod:`cloudckpt.dcp`."""

from cloudckpt.distributed.collectives import Group
from cloudckpt.distributed.replicated import DistributedOptions, commit, load, shares

__all__ = ["DistributedOptions", "Group", "commit", "load", "shares"]
