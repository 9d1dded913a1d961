"""Blobs a host holds already, placed in another of its repositories by hard link.

A host keeps its own tier and the replicas of its partners' saves side by side (all
stored alike, uncompressed): with replicated (DDP) state most blobs of a partner's save
are on this host already, so a transfer asks only for those it cannot link here.
"""

from __future__ import annotations

import logging
import os

from cloudckpt.blobs import BlobReader, blob_key
from cloudckpt.errors import CloudCkptError
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.tiers import peer
from cloudckpt.tiers.local import HostTier

log = logging.getLogger("cloudckpt.tiers")


def siblings(tier: HostTier, dst: Repo) -> peer.Local:
    """Places a blob in ``dst`` by a hard link to the same blob in another repository of
    this host (its own tier, the replicas it keeps; all stored alike), once that blob's
    bytes pass their hash: a replicated state's blobs are not sent to a host that holds
    them already. (Looked for on the first call, in the conversation: a failure to look
    is shared with the peer.)"""
    here = _path(dst)
    others: list[Repo] = []
    looked = False

    def look() -> None:
        nonlocal looked
        looked = True
        replicas = os.path.join(tier.root, "replicas")
        names = sorted(os.listdir(replicas)) if os.path.isdir(replicas) else []
        roots = [tier.root, *(os.path.join(replicas, n) for n in names)]
        others.extend(
            Repo(f"file://{r}", options=RepoOptions(transfer=tier.tier.transfer))
            for r in roots
            if os.path.realpath(r) != os.path.realpath(here)
        )

    def place(digest: str, size: int) -> bool:
        if not looked:
            look()
        key = blob_key(digest)
        for repo in others:
            found = os.path.join(_path(repo), key)
            if not os.path.isfile(found):
                continue
            try:
                BlobReader(repo.store, repo.options.transfer).raw(digest, size)  # verified
                os.makedirs(os.path.dirname(os.path.join(here, key)), exist_ok=True)
                os.link(found, os.path.join(here, key))
            except FileExistsError:
                return True
            except (OSError, CloudCkptError) as e:  # damaged, or no hard links here: send it
                log.debug("not linking blob %s from %s: %s", digest, repo.uri, e)
                continue
            return True
        return False

    return place


def _path(repo: Repo) -> str:
    return repo.uri.removeprefix("file://")
