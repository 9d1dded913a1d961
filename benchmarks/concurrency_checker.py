"""The history checker of the concurrency stress run: the logged history, the sampled
heads and the final index -> violations of I1-I6 (see benchmarks/concurrency.py)."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from concurrency_history import Chaos, History, Lease, read_logs, violation
from concurrency_worker import state_digest

from cloudckpt.errors import CloudCkptError
from cloudckpt.repo import Repo

if TYPE_CHECKING:
    from concurrency_observer import Observer


# -- during the run ---------------------------------------------------------------------
def check_present(repo: Repo, workdir: Path, rng: random.Random) -> list[dict[str, str]]:
    """I1 mid-run: every commit acknowledged so far and not (maybe) deleted is in the
    index; a few of them verify and load with their recorded hash."""
    acked = {e["vid"]: e for e in read_logs(workdir) if e["op"] == "commit" and e["phase"] == "ack"}
    index = repo.index()
    found: list[dict[str, str]] = []
    deleted = _maybe_deleted(read_logs(workdir))  # read after the index: deletions since count
    expected = [vid for vid in acked if vid not in deleted]
    for vid in expected:
        if vid not in index.versions:
            found.append(
                violation(
                    "I1", f"{vid} (acked by {acked[vid]['w']}) missing from the index mid-run", vid
                )
            )
    for vid in rng.sample(expected, min(3, len(expected))):
        problem = _load_problem(repo, vid, acked[vid]["sha"])
        if problem and vid not in _maybe_deleted(read_logs(workdir)):
            found.append(
                violation("I1", f"{vid} (acked by {acked[vid]['w']}) mid-run: {problem}", vid)
            )
    return found


def _load_problem(repo: Repo, vid: str, sha: str) -> str:
    try:
        report = repo.verify(vid)
        if not report.ok:
            return f"verify failed: {sorted(report.problems.items())[:2]}"
        if state_digest(repo.load(vid)) != sha:
            return "loads with another hash than the one committed"
    except CloudCkptError as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return ""


def _maybe_deleted(events: list[dict[str, Any]]) -> set[str]:
    return {v for e in events if e["op"] == "delete" and e["phase"] == "intent" for v in e["vids"]}


# -- at the end -------------------------------------------------------------------------
def analyze(
    events: list[dict[str, Any]], obs: Observer, index: Any, repo: Repo, chaos: Chaos
) -> dict[str, Any]:
    """Check I1-I6 on the logged history, the sampled heads and the final index."""
    h = History.parse(events)
    for vid, c in h.acked.items():  # links of versions the sampler never saw
        obs.parents.setdefault(vid, c.parent)
        obs.branch_of.setdefault(vid, c.branch)
    notes: list[dict[str, str]] = []
    found, verified = check_acked(h, index, repo)
    violations = h.violations + found
    violations += [v for v in obs.periodic if v["key"] not in {x["key"] for x in violations}]
    violations += check_index(h, index, repo, verified)
    heads = head_history(obs)
    violations += check_heads(heads, obs, h.ops)
    violations += check_fences(h, heads, obs, notes)
    violations += check_takeovers(h, obs, chaos, notes)
    h.ops["versions in the final index"] = len(index.versions)
    h.ops["head samples"] = len(obs.samples)
    h.ops["periodic checks"] = obs.periodic_runs
    by_inv = Counter(v["invariant"] for v in violations)
    return {
        "operations": dict(sorted(h.ops.items())),
        "violations": violations,
        "violations_by_invariant": dict(sorted(by_inv.items())),
        "notes": notes,
        "harness_problems": h.crashes,
        "fence_api": h.fence_api,
    }


def check_acked(h: History, index: Any, repo: Repo) -> tuple[list[dict[str, str]], dict[str, str]]:
    """I1: acknowledged and not deleted by retention -> in the index, verifies, loads
    with its hash. The violations, and each version checked -> its problem ("" if none)."""
    found: list[dict[str, str]] = []
    checked: dict[str, str] = {}
    for vid, c in sorted(h.acked.items(), key=lambda vc: vc[1].acked):
        if vid in h.deleted_at:
            continue
        if vid not in index.versions:
            found.append(
                violation(
                    "I1", f"{vid} (acked by {c.writer} seq {c.seq}) is not in the final index", vid
                )
            )
            continue
        checked[vid] = problem = _load_problem(repo, vid, c.sha)
        if problem:
            found.append(violation("I1", f"{vid} (acked by {c.writer}): {problem}", vid))
    return found, checked


def check_index(
    h: History, index: Any, repo: Repo, verified: dict[str, str]
) -> list[dict[str, str]]:
    """I4: each version in the final index was acknowledged, or its outcome is unknown;
    I6: each verifies."""
    found: list[dict[str, str]] = []
    for vid, row in index.versions.items():
        meta = dict(row.meta)
        c = h.commits.get((str(meta.get("writer")), int(meta.get("seq") or 0)))
        if meta.get("writer") == "setup":
            pass
        elif c is None:
            found.append(violation("I4", f"{vid} in the final index matches no logged commit"))
        elif c.outcome in ("refused", "error"):
            found.append(
                violation(
                    "I4",
                    f"{vid} in the final index, but its commit by {c.writer} "
                    f"raised {c.error[:200]}",
                )
            )
        if vid in verified:
            continue
        try:
            report = repo.verify(vid)
            problem = "" if report.ok else f"{sorted(report.problems.items())[:1]}"
        except CloudCkptError as e:
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem:
            how = (
                "deleted by retention, back in the index"
                if vid in h.deleted_at
                else f"commit outcome {c.outcome}"
                if c
                else "no logged commit"
            )
            found.append(
                violation(
                    "I6",
                    f"{vid} in the final index ({meta.get('writer')} seq "
                    f"{meta.get('seq')}, {how}) does not verify: {problem}",
                )
            )
    return found


def head_history(obs: Observer) -> dict[str, list[str]]:
    """Branch -> the heads sampled, in order, repeats collapsed."""
    history: dict[str, list[str]] = defaultdict(list)
    for _, _, heads in sorted(obs.samples):
        for branch, head in heads.items():
            if not history[branch] or history[branch][-1] != head:
                history[branch].append(head)
    return history


def check_heads(
    history: dict[str, list[str]], obs: Observer, ops: Counter[str]
) -> list[dict[str, str]]:
    """I2: each sampled head descends from the one sampled before it."""
    found: list[dict[str, str]] = []
    for branch, heads in history.items():
        ops[f"head moves seen on {branch}"] += len(heads) - 1
        for old, new in itertools.pairwise(heads):
            descends = _descends(new, old, obs.parents)
            if descends is False:
                found.append(
                    violation("I2", f"head of {branch} moved from {old} to {new}, not a descendant")
                )
            elif descends is None:
                ops["head moves with unknown lineage"] += 1
    return found


def check_fences(
    h: History, history: dict[str, list[str]], obs: Observer, notes: list[dict[str, str]]
) -> list[dict[str, str]]:
    """I3 (order): along the lineage of every head seen, fences never decrease."""
    rank = _fence_ranks(h.leases, h.fence_api)
    notes.append(
        _note(
            "fences",
            "the library's (WriterLease.fence)"
            if h.fence_api
            else "synthetic: lease acquisition order (the library has no fence)",
        )
    )
    found: list[dict[str, str]] = []
    for branch, heads in history.items():
        for head in dict.fromkeys(heads):
            best: tuple[float, str] | None = None
            for vid in reversed(_lineage(head, obs.parents)):
                fence = rank.get((obs.metas.get(vid) or {}).get("lease", ""))
                if obs.branch_of.get(vid) != branch or fence is None:
                    continue
                if best is not None and fence < best[0]:
                    writer = obs.metas[vid].get("writer")
                    found.append(
                        violation(
                            "I3",
                            f"{vid} ({writer}, fence {fence:g}) follows "
                            f"{best[1]} (fence {best[0]:g}) on {branch}",
                            f"fence {vid}",
                        )
                    )
                if best is None or fence > best[0]:
                    best = (fence, vid)
    return list({v["key"]: v for v in found}.values())


def check_takeovers(
    h: History, obs: Observer, chaos: Chaos, notes: list[dict[str, str]]
) -> list[dict[str, str]]:
    """I3 (takeover): no commit is acknowledged to a writer whose lease was taken over
    before that commit started, or before it was published (not among the versions the
    new holder saw right after acquiring, nor sampled earlier)."""
    takeover: dict[str, Lease] = {}  # old token -> the lease that took over from it
    for held in _held_by_branch(h.leases):
        for i, old in enumerate(held):
            new = next(
                (n for n in held[i + 1 :] if old.released is None or old.released > n.acquired),
                None,
            )
            if new is not None:
                takeover[old.token] = new
    killed = {k["w"]: k["t"] for k in chaos.kills}
    for token, new in takeover.items():
        dead = killed.get(h.leases[token].writer, float("inf")) < new.acquired
        h.ops["lease takeovers (holder killed)" if dead else "lease takeovers (holder alive)"] += 1
    found: list[dict[str, str]] = []
    for vid, c in h.acked.items():
        new = takeover.get(c.token)
        if new is None or c.acked <= new.logged:
            continue
        later = c.intent > new.logged
        unseen = (
            new.snapshot is not None
            and vid not in new.snapshot
            and obs.first_seen.get(vid, float("inf")) >= new.read_start
            and h.deleted_at.get(vid, float("inf")) >= new.logged
        )
        if later or unseen:
            why = "started" if later else "was published"
            found.append(
                violation(
                    "I3",
                    f"{vid} by {c.writer} {why} after {new.writer} took over "
                    f"its lease on {c.branch}, and was acknowledged",
                    f"takeover {vid}",
                )
            )
        else:
            kind = "acknowledged after its lease was taken over, published before (or unknown)"
            notes.append(_note(kind, f"{vid} by {c.writer}"))
    return found


def _note(kind: str, detail: str) -> dict[str, str]:
    return {"kind": kind, "detail": detail}


def _descends(new: str, old: str, parents: dict[str, str | None]) -> bool | None:
    """Whether ``old`` is an ancestor of (or is) ``new``; None if a link is unknown."""
    cur: str | None = new
    for _ in range(len(parents) + 1):
        if cur == old:
            return True
        if cur is None:
            return False
        if cur not in parents:
            return None
        cur = parents[cur]
    return False  # a cycle


def _lineage(head: str, parents: dict[str, str | None]) -> list[str]:
    """``head`` and its known ancestors, newest first."""
    out: list[str] = []
    cur: str | None = head
    while cur is not None and cur not in out and len(out) <= len(parents):
        out.append(cur)
        cur = parents.get(cur)
    return out


def _fence_ranks(leases: dict[str, Lease], fence_api: bool) -> dict[str, float]:
    """Lease token -> its fence: the library's, or its acquisition order on the branch."""
    if fence_api:
        return {t: x.fence for t, x in leases.items() if isinstance(x.fence, (int, float))}
    ranks: dict[str, float] = {}
    for held in _held_by_branch(leases):
        ranks.update({x.token: float(i) for i, x in enumerate(held)})
    return ranks


def _held_by_branch(leases: dict[str, Lease]) -> list[list[Lease]]:
    """The leases held on each branch, in acquisition order."""
    return [
        sorted((x for x in leases.values() if x.branch == branch), key=lambda x: x.acquired)
        for branch in {x.branch for x in leases.values()}
    ]
