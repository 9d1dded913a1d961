"""What changed between two versions: arrays added, removed and changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudckpt.blobs import iter_chunks
from cloudckpt.tree import tensors_by_path

if TYPE_CHECKING:
    import torch

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
    ea = {e["path"]: e for e in repo.manifest(va).tensors}
    eb = {e["path"]: e for e in repo.manifest(vb).tensors}
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
    # Small arrays share pack blobs: a changed pack does not mean each member changed,
    # so packed arrays are compared by content (they are small by definition).
    packed = [c.path for c in out.changed if not c.note and _packed(eb[c.path])]
    floats = [c.path for c in out.changed if not c.note and _is_float(eb[c.path])]
    wanted = sorted(set(packed) | (set(floats) if norms else set()))
    if wanted:
        import torch

        ta = tensors_by_path(repo.load(va.id, keys=wanted))
        tb = tensors_by_path(repo.load(vb.id, keys=wanted))
        for change in list(out.changed):
            x, y = ta.get(change.path), tb.get(change.path)
            if x is None or y is None:
                continue
            if change.path in packed and torch.equal(_bytes(x), _bytes(y)):
                out.changed.remove(change)
                out.unchanged += 1
                continue
            if change.path in floats and norms:
                change.norm = float(torch.linalg.vector_norm(y.double() - x.double()))
    return out


def _packed(entry: dict[str, Any]) -> bool:
    return any(c.size != c.blob_size for c in iter_chunks(entry))


def _bytes(t: Any) -> torch.Tensor:
    import torch

    if not isinstance(t, torch.Tensor):
        t = torch.from_numpy(t)
    return t.contiguous().reshape(-1).view(torch.uint8)


def _is_float(entry: dict[str, Any]) -> bool:
    return entry["kind"] == "torch" and entry["dtype"].startswith(("float", "bfloat"))
