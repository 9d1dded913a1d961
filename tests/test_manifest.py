"""Garbled manifests: every kind ends in CorruptCheckpoint naming the manifest, before
anything is allocated, and ``restore`` falls back past the version to its parent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from forgery import forge_manifest
from torch import nn

from cloudckpt import CheckpointManager, Repo, RepoOptions, TransferOptions
from cloudckpt.blobs import blob_key
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.manifest import key

OPTIONS = RepoOptions(transfer=TransferOptions(pack_below=1024))


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(64, 64)


def two_versions(uri: str) -> tuple[Repo, dict[str, torch.Tensor]]:
    """Versions 1 and 2 of a model, each with extra state that has every kind of node;
    returns the repository and version 1's model state."""
    mgr = CheckpointManager(uri, options=OPTIONS, save_every_steps=1)
    model = net(0)
    mgr.restore(model=model)
    first: dict[str, torch.Tensor] = {}
    for step in (1, 2):
        with torch.no_grad():
            model.weight.add_(1.0)
        extra = {
            "scalar": np.int8(7),
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
            "blob": b"\x00\x01",
            (1, "k"): "tuple key",
        }
        mgr.step(step, extra=extra)
        first = first or {k: v.clone() for k, v in model.state_dict().items()}
    mgr.close()
    return mgr.repo, first


def garble_head(repo: Repo, change: Callable[[dict[str, Any]], Any]) -> str:
    head = repo.resolve("main")
    doc = json.loads(repo.store.get(key(head.id)))
    doc = change(doc) or doc
    forge_manifest(repo, head.id, doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return key(head.id)


def nested(depth: int) -> bytes:
    return b'{"list": [' * depth + b"null" + b"]}" * depth


def find(node: Any, tag: str) -> dict[str, Any]:
    """The first skeleton node with ``tag``."""
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            if tag in cur:
                return cur
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    raise AssertionError(f"no {tag} node")


def deep(depth: int) -> Callable[[dict[str, Any]], bytes]:
    def change(doc: dict[str, Any]) -> bytes:
        doc["state"] = "@@"
        return json.dumps(doc).encode().replace(b'"@@"', nested(depth))

    return change


def set_in(tag: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        find(doc["state"], tag)[tag] = value

    return change


def first_entry(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["tensors"][0][field] = value

    return change


def chunk_sizes_as_strings(doc: dict[str, Any]) -> None:
    for chunk in doc["tensors"][0]["chunks"]:
        chunk[1] = str(chunk[1])


def list_as_key(doc: dict[str, Any]) -> None:
    pair = find(doc["state"], "dict")["dict"][0]
    pair[0] = {"list": [1, 2]}


GARBLES = {
    "nested 5,000 deep": deep(5_000),
    "nested 100,000 deep": deep(100_000),
    "numpy scalar out of range": set_in("npscalar", ["|i1", 300]),
    "numpy scalar of a string": set_in("npscalar", ["<f4", "x"]),
    "size of strings": set_in("size", ["2", "3"]),
    "shape of strings": first_entry("shape", ["64", "64"]),
    "chunk sizes as strings": chunk_sizes_as_strings,
    "a list as a dict key": list_as_key,
    "a bad device string": set_in("device", "warp-drive:9"),
    "bytes not base64": set_in("bytes", "!!"),
    "a huge number": first_entry("shape", [2**70]),
    "a negative step": lambda doc: doc.update(step=-1) or doc.update(step="5/../../x"),
    "a version id that is a path": lambda doc: doc.update(id="../../etc/passwd"),
    "the entries are not a list": lambda doc: doc.update(tensors={"a": 1}),
    "not an object": lambda doc: b"[1, 2, 3]",
    "not JSON": lambda doc: b"\xff\xfe garbage",
}


def empty_but_vast(doc: dict[str, Any]) -> None:
    vast = [0, 2**62, 2**62]
    entry = {"path": "extra.vast", "kind": "torch", "dtype": "float32", "shape": vast}
    doc["tensors"].append({**entry, "chunks": []})
    find(doc["state"], "dict")["dict"].append(["vast", {"tensor": len(doc["tensors"]) - 1}])


MORE = {
    "an empty array of impossible extent": empty_but_vast,
    "a quantized dtype": first_entry("dtype", "qint8"),
    "a sub-byte dtype": first_entry("dtype", "uint3"),
    "format true": lambda doc: doc.update(format=True),
    "format 2.0": lambda doc: doc.update(format=2.0),
}
GARBLES.update(MORE)


@pytest.mark.parametrize("garble", list(GARBLES.values()), ids=list(GARBLES))
def test_a_garbled_manifest_is_named_and_restore_falls_back(
    tmp_path: Path, garble: Callable[[dict[str, Any]], Any]
) -> None:
    uri = f"file://{tmp_path}/repo"
    repo, first = two_versions(uri)
    where = garble_head(repo, garble)

    with pytest.raises(CorruptCheckpoint, match=where.replace(".", r"\.")):
        repo.load()
    assert where in repo.verify().problems
    model = net(9)
    resumed = CheckpointManager(uri, options=OPTIONS).restore(model=model)
    assert resumed.step == 1 and list(resumed.skipped) == [repo.resolve("main").id]
    assert all(torch.equal(model.state_dict()[k], first[k]) for k in first)


def test_a_state_that_does_not_fit_the_model_falls_back(tmp_path: Path) -> None:
    """A consistent manifest whose shapes were changed (chunks still add up) loads, but
    not into the model: restore passes over it as corrupt."""
    uri = f"file://{tmp_path}/repo"
    repo, first = two_versions(uri)
    garble_head(repo, first_entry("shape", [4096, 1]))
    model = net(9)
    resumed = CheckpointManager(uri, options=OPTIONS).restore(model=model)
    assert resumed.step == 1 and "does not load into" in next(iter(resumed.skipped.values()))
    assert all(torch.equal(model.state_dict()[k], first[k]) for k in first)


def test_a_failed_load_into_objects_is_repaired_by_loading_an_older_version(
    tmp_path: Path,
) -> None:
    """``load(into=...)`` decodes straight into the objects' tensors, so a load that fails
    on a later blob leaves part of the new data there (documented); loading another
    version into the same objects then makes them exactly that version."""
    uri = f"file://{tmp_path}/repo"
    repo, first = two_versions(uri)
    head = repo.manifest("main")
    blob = sorted(head.digests() - repo.manifest(head.version.parent).digests())[-1]

    data = bytearray(repo.store.get(blob_key(blob)))
    data[-1] ^= 0xFF
    repo.store.put(blob_key(blob), bytes(data))
    model = net(9)
    with pytest.raises(CorruptCheckpoint, match=blob):
        repo.load(into={"model": model})
    resumed = CheckpointManager(uri, options=OPTIONS).restore(model=model)
    assert resumed.step == 1
    assert all(torch.equal(model.state_dict()[k], first[k]) for k in first)


TIB = 2**40


def claims_a_tebibyte(stored: int) -> Callable[[dict[str, Any]], None]:
    """The first entry claims 1 TiB held by one chunk of its first blob, stored in
    ``stored`` bytes: every size consistent, so only the blob itself can refute it."""

    def change(doc: dict[str, Any]) -> None:
        entry = doc["tensors"][0]
        digest = entry["chunks"][0][0]
        entry["shape"] = [TIB // 4]
        entry["dtype"] = "float32"
        entry["chunks"] = [[digest, TIB, stored, 0, TIB]]

    return change


@pytest.mark.parametrize("stored", [80, 2**26], ids=["small-claim", "plausible-claim"])
def test_a_tebibyte_claim_is_refused_before_allocating(tmp_path: Path, stored: int) -> None:
    """A plausible stored size passes the manifest's own bounds; the blob's size in the
    store (one HEAD) refutes it, before any array is allocated."""
    uri = f"file://{tmp_path}/repo"
    repo, first = two_versions(uri)
    where = garble_head(repo, claims_a_tebibyte(stored))
    with pytest.raises(CorruptCheckpoint, match=rf"{where if stored == 80 else 'blobs/'}.*bytes"):
        repo.load()
    model = net(9)
    assert CheckpointManager(uri, options=OPTIONS).restore(model=model).step == 1
    assert all(torch.equal(model.state_dict()[k], first[k]) for k in first)


def test_a_well_formed_edit_of_a_manifest_alone_is_caught_by_its_recorded_hash(
    tmp_path: Path,
) -> None:
    """Swapping two dimensions keeps every size consistent: only the hash versions.json
    recorded at commit tells the manifest was altered."""
    uri = f"file://{tmp_path}/repo"
    repo, _ = two_versions(uri)
    head = repo.resolve("main")
    doc = json.loads(repo.store.get(key(head.id)))
    weight = next(e for e in doc["tensors"] if e["path"] == "model.weight")
    weight["shape"] = [*weight["shape"][::-1], 1]
    repo.store.put(key(head.id), json.dumps(doc).encode())
    with pytest.raises(CorruptCheckpoint, match="altered after its commit"):
        repo.load()
    assert CheckpointManager(uri, options=OPTIONS).restore(model=net(9)).step == 1


def test_a_row_of_versions_json_that_disagrees_with_its_manifest_is_refused(
    tmp_path: Path,
) -> None:
    uri = f"file://{tmp_path}/repo"
    repo, _ = two_versions(uri)
    index = json.loads(repo.store.get("versions.json"))
    index["versions"][-1]["step"] = 7
    repo.store.put("versions.json", json.dumps(index).encode())
    with pytest.raises(CorruptCheckpoint, match="disagree"):
        repo.load()
