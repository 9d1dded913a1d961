"""What changed between two versions: arrays added, removed and changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cloudckpt.blobs import iter_chunks
from cloudckpt.tree import tensors_by_path

if TYPE_CHECKING:
    from cloudckpt.repo import Repo


@dataclass
class Change:
    """One array present in both versions with different bytes."""

    path: str
    changed_bytes: int  # bytes in chunks whose content differs
    total_bytes: int
    norm: float | None = None  # ||b - a||_2 for same-shape floating-point tensors
    note: str = ""


@dataclass
class Diff:
    a: str
    b: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0

    @property
    def changed_bytes(self) -> int:
        return sum(c.changed_bytes for c in self.changed)


def diff_versions(repo: Repo, a: str, b: str, norms: bool = True) -> Diff:
    """Compare versions ``a`` and ``b`` by their chunk hashes (no download), then, with
    ``norms``, fetch only the changed floating-point tensors for the norm of the change."""
    va, vb = repo.resolve(a), repo.resolve(b)
    ea = {e["path"]: e for e in repo.manifest(va.id)["tensors"]}
    eb = {e["path"]: e for e in repo.manifest(vb.id)["tensors"]}
    out = Diff(
        va.id, vb.id, added=sorted(eb.keys() - ea.keys()), removed=sorted(ea.keys() - eb.keys())
    )
    for path in sorted(ea.keys() & eb.keys()):
        x, y = ea[path], eb[path]
        cx = [(c.digest, c.blob_offset, c.size) for c in iter_chunks(x)]
        cy = [(c.digest, c.blob_offset, c.size) for c in iter_chunks(y)]
        total = sum(c[2] for c in cy)
        if (x["dtype"], x["shape"]) != (y["dtype"], y["shape"]):
            note = f"{x['dtype']}{x['shape']} -> {y['dtype']}{y['shape']}"
            out.changed.append(Change(path, total, total, note=note))
        elif cx != cy:
            changed = sum(c[2] for c, d in zip(cx, cy, strict=False) if c != d)
            out.changed.append(Change(path, changed, total))
        else:
            out.unchanged += 1
    wanted = [c.path for c in out.changed if not c.note and _is_float(eb[c.path])]
    if norms and wanted:
        ta = _flat(repo.load(va.id, keys=wanted))
        tb = _flat(repo.load(vb.id, keys=wanted))
        for change in out.changed:
            if change.path in ta and change.path in tb:
                delta = tb[change.path].double() - ta[change.path].double()
                change.norm = float(torch.linalg.vector_norm(delta))
    return out


def _is_float(entry: dict[str, Any]) -> bool:
    return entry["kind"] == "torch" and entry["dtype"].startswith(("float", "bfloat"))


def _flat(state: Any) -> dict[str, torch.Tensor]:
    return tensors_by_path(state)
