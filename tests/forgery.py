"""Altering a stored manifest the way an attacker with write access to the bucket can:
the manifest and the hash ``versions.json`` records for it together, so that what is
tested is the manifest's own validation, not the hash that would catch a lone edit."""

from __future__ import annotations

import json

from cloudckpt import Repo
from cloudckpt.codec import content_hash
from cloudckpt.manifest import key


def forge_manifest(repo: Repo, vid: str, data: bytes) -> None:
    repo.store.put(key(vid), data)
    index = json.loads(repo.store.get("versions.json"))
    for row in index["versions"]:
        if row["id"] == vid:
            row["manifest_hash"] = content_hash(data)
    repo.store.put("versions.json", json.dumps(index).encode())
