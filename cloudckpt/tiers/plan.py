"""The plan of a restore from the local tiers of a job's hosts (computed on rank 0).

Each host's leader reports what it can restore from: its own local versions and the
replicas of other hosts it keeps, as ``[place, version id]`` of those a restore may take
(the place, ``[generation, step]``, orders the run's saves the same on every host). The
target is the newest place every host reaches, in its own tier or as a
replica some other host keeps (the partner's first); the plan moves it into each own
tier that lacks it, then re-creates the replicas partners lack, in rounds in which each
host sends at most once and receives at most once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloudckpt.tiers.replicas import HostMap


def plan(hosts: HostMap, reports: list[dict[str, Any]], replicated: bool = False) -> dict[str, Any]:
    """The target step and the transfers that put it in every host's own tier, then
    re-create the replicas partners lack (from every leader's report; None for the
    other ranks). ``replicated``: every host saves the same state (the manager's DDP
    state), so a host may also take another host's own version -- a replacement host
    with a new id has no replica of its own anywhere."""
    held = {r["host"]: r for r in reports if r is not None}
    if len({r["head"] for r in held.values()}) > 1:
        return {"target": None, "reason": "the ranks disagree on the bucket head"}

    def reachable(h: str) -> dict[Any, tuple[str, str, str, str]]:
        """step -> (from host, "own", "replica" or "peer", version id, whose version)
        for host ``h``; its own first, then its replicas (the partner's first), then
        (replicated) the other hosts' own versions."""
        found: dict[int, tuple[str, str, str, str]] = {}
        holders = [hosts.partner(h)] + [g for g in hosts.hosts if g != hosts.partner(h)]
        others = [g for g in holders if g is not None and g != h]
        for g in reversed(others if replicated else []):
            for step, vid in reversed(held[g]["own"]):
                found[_key(step)] = (g, "peer", vid, g)
        for g in reversed(others):
            for step, vid in reversed(held[g]["replicas"].get(h, [])):
                found[_key(step)] = (g, "replica", vid, h)
        for step, vid in reversed(held[h]["own"]):
            found[_key(step)] = (h, "own", vid, h)
        return found

    reach = {h: reachable(h) for h in hosts.hosts}
    common = set.intersection(*(set(r) for r in reach.values()))
    if not common:
        lacking = [h for h in hosts.hosts if not reach[h]]
        why = f"no local version of {lacking}" if lacking else "no step common to all hosts"
        return {"target": None, "reason": why}
    step = max(common)
    fetch = [
        {"src": g, "dst": h, "of": of, "id": vid, "into": "own"}
        for h in hosts.hosts
        for g, kind, vid, of in [reach[h][step]]
        if kind != "own"
    ]
    recreate = []
    for h in hosts.hosts:
        p = hosts.partner(h)
        if p is not None and step not in {_key(s) for s, _ in held[p]["replicas"].get(h, [])}:
            recreate.append({"src": h, "dst": p, "of": h, "id": None, "into": "replica"})
    own = {h: reach[h][step][2] for h in hosts.hosts if reach[h][step][1] == "own"}
    return {"target": step, "own": own, "fetch": _rounds(fetch), "recreate": _rounds(recreate)}


def _key(place: Any) -> Any:
    """A save's place as a dict key: ``[generation, step]`` (JSON) as a tuple."""
    return tuple(place) if isinstance(place, list) else place


def _rounds(transfers: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Transfers in rounds where each host sends at most once and receives at most once."""
    rounds: list[list[dict[str, Any]]] = []
    for t in transfers:
        for r in rounds:
            if all(t["src"] != o["src"] and t["dst"] != o["dst"] for o in r):
                r.append(t)
                break
        else:
            rounds.append([t])
    return rounds
