"""Concurrency stress run: many processes commit, collect, repair and prune one repository.

    python benchmarks/concurrency.py [--seconds 300] [--seed 2026]
        [--out benchmarks/RESULTS-concurrency.md] [--json report.json] [--workdir DIR]

One SeaweedFS on 127.0.0.1 behind a ``FaultProxy`` (503s, 500s, dropped connections,
stalls past the read timeout). Worker processes (``benchmarks/concurrency_worker.py``):
committers on branches ``main`` and ``b2``, each committing under the branch's writer
lease (fenced where the library supports it); a ``gc(grace=0)`` loop; a ``repair()``
loop; and a retention loop deleting old versions. The parent SIGSTOPs a committer that
holds its lease for longer than the lease's ttl, then SIGCONTs it; it SIGKILLs and
restarts another at random moments. Every worker logs each operation's intent and
outcome; a sampler thread records the branch heads every half second. At the end (and
every few seconds during the run, read-only) the history is checked:

* I1 every acknowledged commit not deleted by retention is in ``versions.json``,
  verifies, and loads with the sha256 recorded at commit;
* I2 sampled branch heads only ever move to descendants;
* I3 along a branch's lineage fences never decrease, and no writer's commit is
  acknowledged after its lease was taken over;
* I4 every version in the final index was acknowledged or had an unknown outcome
  (killed mid-commit, or a store error after exhausted retries), none was refused;
* I5 no gc or repair run raised, except store errors after exhausted retries and a gc
  stopping itself before deleting (``SweepExpired``), both counted;
* I6 every version in the final index verifies.

Exit status: 0 without violations, 1 with, 2 if the harness itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloudckpt.errors import CloudCkptError
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.store import RetryPolicy, StoreOptions
from cloudckpt.testing.faults import FaultPlan, FaultProxy
from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY, SeaweedFS

HERE = Path(__file__).resolve().parent
WORKER = HERE / "concurrency_worker.py"
sys.path.insert(0, str(HERE))
from concurrency_worker import state_digest  # noqa: E402

log = logging.getLogger("concurrency")
FAULT_KINDS = ("slowdown", "internal", "reset", "stall")
#: Outcomes that are definite refusals: the version must never appear.
REFUSALS = {"CommitConflict", "LeaseHeld", "FencedOut"}
#: A gc that refuses to sweep once its own sweep record lapsed: not a violation of I5.
SAFE_ABORTS = {"SweepExpired"}
#: What the parent's read-only observers use (straight to SeaweedFS, no faults).
OBSERVER_STORE = StoreOptions(
    connect_timeout=5.0, read_timeout=30.0, retry=RetryPolicy(attempts=4, total_seconds=60)
)


# -- processes ------------------------------------------------------------------------
@dataclass
class Actor:
    """A worker role; each (re)start is a new incarnation with its own log."""

    role: str
    base: str
    branch: str | None
    cfg: dict[str, Any]
    workdir: Path
    incarnation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    name: str = ""
    tail: LogTail | None = None
    exits: list[tuple[str, int | None]] = field(default_factory=list)

    def start(self) -> None:
        self.incarnation += 1
        self.name = f"{self.base}.{self.incarnation}"
        logfile = self.workdir / f"{self.name}.jsonl"
        cfg = {**self.cfg, "name": self.name, "role": self.role, "branch": self.branch,
               "log": str(logfile)}  # fmt: skip
        path = self.workdir / f"{self.name}.json"
        path.write_text(json.dumps(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.workdir / f"{self.name}.err", "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), str(path)], env=env,
                                         stdout=err, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        self.tail = LogTail(logfile)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def reap(self, timeout: float) -> None:
        """Wait for the process; SIGKILL it (by PID) after ``timeout`` seconds."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        try:
            self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.exits.append((self.name, None))
        else:
            self.exits.append((self.name, self.proc.returncode))
        self.proc = None


class LogTail:
    """Follows a worker's log as it grows: its last event, and whether it holds a lease."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.last: dict[str, Any] = {"op": "", "phase": ""}
        self.holding = self.started = False

    def poll(self) -> LogTail:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1  # a torn last line waits for its end
            self.offset += end
            for line in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    self.last = json.loads(line)
                    self.started |= self.last["op"] == "worker"
                    if self.last["op"] == "lease":
                        self.holding = self.last["phase"] == "acquired"
        return self


def read_logs(workdir: Path) -> list[dict[str, Any]]:
    """Every complete event of every worker log (a line torn by SIGKILL is skipped)."""
    events: list[dict[str, Any]] = []
    for path in sorted(workdir.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


# -- observing --------------------------------------------------------------------------
class Observer:
    """Samples branch heads and parent links (I2, I3) and checks I1 during the run."""

    def __init__(self, repo_args: tuple[str, dict[str, Any]], workdir: Path) -> None:
        self.repo_args, self.workdir = repo_args, workdir
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float, dict[str, str]]] = []  # (start, end, heads)
        self.parents: dict[str, str | None] = {}
        self.metas: dict[str, dict[str, Any]] = {}
        self.branch_of: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}  # vid -> end of the first sample holding it
        self.periodic: list[dict[str, str]] = []
        self.periodic_runs = 0
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._sample, daemon=True),
                        threading.Thread(target=self._check, daemon=True)]  # fmt: skip

    def repo(self) -> Repo:
        uri, opts = self.repo_args
        return Repo(uri, opts, options=RepoOptions(store=OBSERVER_STORE))

    def record(self, index: Any, start: float, end: float) -> None:
        with self.lock:
            self.samples.append((start, end, dict(index.branches)))
            with open(self.workdir / "samples.ndjson", "a") as f:
                row = {"start": start, "end": end, "heads": index.branches,
                       "vids": sorted(index.versions)}  # fmt: skip
                f.write(json.dumps(row) + "\n")
            for v in index.versions.values():
                self.parents[v.id] = v.parent
                self.metas[v.id] = dict(v.meta)
                self.branch_of[v.id] = v.branch
                self.first_seen.setdefault(v.id, end)

    def _sample(self) -> None:
        repo = self.repo()
        while not self.stop.wait(0.5):
            start = time.monotonic()
            try:
                index = repo.index()
            except Exception as e:  # reported; the checker keeps going
                self.errors[f"sample: {type(e).__name__}"] += 1
                continue
            self.record(index, start, time.monotonic())

    def _check(self) -> None:
        repo, rng = self.repo(), random.Random(0)
        while not self.stop.wait(10.0):
            try:
                self.periodic.extend(check_present(repo, self.workdir, rng))
                self.periodic_runs += 1
            except Exception as e:
                self.errors[f"periodic check: {type(e).__name__}"] += 1

    def __enter__(self) -> Observer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


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
            found.append(_v("I1", f"{vid} (acked by {acked[vid]['w']}) missing from the index "
                                  "mid-run", vid))  # fmt: skip
    for vid in rng.sample(expected, min(3, len(expected))):
        problem = _load_problem(repo, vid, acked[vid]["sha"])
        if problem and vid not in _maybe_deleted(read_logs(workdir)):
            found.append(_v("I1", f"{vid} (acked by {acked[vid]['w']}) mid-run: {problem}", vid))
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


def _v(invariant: str, detail: str, key: str = "") -> dict[str, str]:
    return {"invariant": invariant, "detail": detail, "key": key or detail}


# -- the run ----------------------------------------------------------------------------
@dataclass
class Chaos:
    """The SIGSTOPs and SIGKILLs the parent dealt, with their monotonic times."""

    stops: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)


def in_flight_commit(actor: Actor) -> bool:
    """The actor holds its lease and its last event is a commit's intent."""
    tail = actor.tail.poll() if actor.tail else None
    return bool(tail and tail.holding and (tail.last["op"], tail.last["phase"]) == (
        "commit", "intent"))  # fmt: skip


def orchestrate(actors: list[Actor], args: argparse.Namespace, deadline: float,
                rng: random.Random) -> Chaos:  # fmt: skip
    """Until ``deadline``: stop a main committer that holds the lease mid-commit for
    2.5 ttl, then resume it; kill the designated victim at random moments and restart it."""
    chaos = Chaos()
    stoppable = [a for a in actors if a.role == "committer" and a.branch == "main"]
    victim = next(a for a in actors if a.base == "c-b2-0")
    stop_len = 2.5 * args.ttl
    start = time.monotonic()
    next_stop, next_kill = start + min(8.0, 0.15 * args.seconds), start + rng.uniform(5, 12)
    stopped: tuple[Actor, float] | None = None
    kill_armed: float | None = None
    while (now := time.monotonic()) < deadline:
        if any(a.proc is None or a.proc.poll() is not None for a in actors):
            break  # a worker died on its own: a harness problem, reported with its exit
        if stopped is not None and now >= stopped[1]:
            stopped[0].signal(signal.SIGCONT)
            chaos.stops[-1]["resumed"] = now
            stopped, next_stop = None, now + max(10.0, 2 * stop_len)
        elif stopped is None and now >= next_stop and deadline - now > stop_len + 5:
            patient = now - next_stop > 8.0  # no commit in flight lately: any holder will do
            for a in stoppable:
                mid_commit = in_flight_commit(a)
                if a.proc and (mid_commit or (patient and _holds(a))):
                    a.signal(signal.SIGSTOP)
                    chaos.stops.append({"w": a.name, "t": now, "mid_commit": mid_commit})
                    stopped = (a, now + stop_len)
                    break
        if kill_armed is None and now >= next_kill and deadline - now > 8:
            kill_armed = now
        if kill_armed is not None and (in_flight_commit(victim) or now - kill_armed > 3):
            time.sleep(rng.uniform(0, 0.05))
            victim.signal(signal.SIGKILL)
            chaos.kills.append({"w": victim.name, "t": time.monotonic()})
            victim.reap(30)
            victim.start()
            kill_armed, next_kill = None, time.monotonic() + rng.uniform(8, 15)
        time.sleep(0.05)
    if stopped is not None:
        stopped[0].signal(signal.SIGCONT)
        chaos.stops[-1]["resumed"] = time.monotonic()
    return chaos


def _holds(actor: Actor) -> bool:
    return bool(actor.tail and actor.tail.poll().holding)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Set up, stress, shut down and check; the report as a dict."""
    t_start = time.monotonic()
    rng = random.Random(args.seed)
    plan = FaultPlan(rate=args.fault_rate, seed=args.seed, kinds=FAULT_KINDS,
                     stall_seconds=args.read_timeout + 1.0)  # fmt: skip
    actors: list[Actor] = []
    with SeaweedFS(workdir / "weed") as server, FaultProxy(server.endpoint, plan) as proxy:
        uri = server.fresh_uri("concurrency")
        observed = (uri, server.storage_options())
        setup = Repo(uri, server.storage_options())
        setup.commit({"shared": torch.arange(4096, dtype=torch.float32)}, branch="main",
                     step=0, meta={"writer": "setup", "seq": 0})  # fmt: skip
        setup.branch("b2", "main")
        stop_file, go_file = workdir / "STOP", workdir / "GO"
        common = {
            "uri": uri, "storage_options": proxy.storage_options(
                {"key": ACCESS_KEY, "secret": SECRET_KEY}),
            "seed": args.seed, "stop_file": str(stop_file), "go_file": str(go_file),
            "start_timeout": 300, "ttl": args.ttl, "commits_per_lease": [2, 5],
            "keep": args.keep,
            "store": {"connect_timeout": args.read_timeout, "read_timeout": args.read_timeout,
                      "attempts": 12, "total_seconds": 30.0},
        }  # fmt: skip
        roles = [*((f"c-main-{i}", "committer", "main") for i in range(args.main_committers)),
                 *((f"c-b2-{i}", "committer", "b2") for i in range(args.b2_committers)),
                 ("gc", "gc", None), ("repair", "repair", None),
                 ("retention", "retention", None)]  # fmt: skip
        pauses = {"gc": [0.2, 1.0], "repair": [2.0, 4.0], "retention": [1.0, 3.0]}
        for base, role, branch in roles:
            cfg = {**common, "pause": pauses.get(role, [0, 0])}
            actors.append(Actor(role, base, branch, cfg, workdir))
        chaos = Chaos()
        try:
            for a in actors:
                a.start()
            ready_by = time.monotonic() + 300
            while not all(_ready(a) for a in actors):
                dead = [a.name for a in actors if a.proc and a.proc.poll() is not None]
                if dead or time.monotonic() > ready_by:
                    raise RuntimeError(f"workers did not start (exited: {dead})")
                time.sleep(0.2)
            t_go = time.monotonic()
            deadline = t_go + args.seconds
            go_file.write_text(json.dumps({"deadline": deadline}))
            print(f"{len(actors)} workers running for {args.seconds:.0f}s", flush=True)
            with Observer(observed, workdir) as observer:
                chaos = orchestrate(actors, args, deadline, rng)
                stop_file.write_text("stop")
                reap_by = time.monotonic() + 90
                for a in actors:
                    a.reap(reap_by - time.monotonic())
            t_stress = time.monotonic() - t_go
            faults = {k: proxy.counts[k] for k in ("requests", *FAULT_KINDS)}
        finally:
            stop_file.write_text("stop")
            for a in actors:
                a.reap(10)
        final = observer.repo()
        index = final.index()
        observer.record(index, time.monotonic(), time.monotonic())
        report = analyze(read_logs(workdir), observer, index, final, chaos)
    report.update(
        seconds=args.seconds, stress_seconds=round(t_stress, 1),
        wall_seconds=round(time.monotonic() - t_start, 1), seed=args.seed, faults=faults,
        fault_plan={"rate": plan.rate, "kinds": list(plan.kinds),
                    "stall_seconds": plan.stall_seconds},
        kills=len(chaos.kills), stops=len(chaos.stops), stops_detail=chaos.stops,
        worker_exits=[x for a in actors for x in a.exits],
    )  # fmt: skip
    killed = {k["w"] for k in chaos.kills}
    crashed = [f"{n} exited {rc}" for a in actors for n, rc in a.exits
               if rc not in (0, None) and n not in killed]  # fmt: skip
    report["harness_problems"] += crashed + [f"{k} x{n}" for k, n in observer.errors.items()]
    return report


def _ready(actor: Actor) -> bool:
    return bool(actor.tail and actor.tail.poll().started)


# -- the checker ------------------------------------------------------------------------
@dataclass
class Commit:
    """One commit attempt, from its intent and outcome events."""

    writer: str
    seq: int
    branch: str
    token: str
    sha: str
    intent: float
    outcome: str = "unknown"  # ack | refused | store_error | error | unknown (killed)
    vid: str | None = None
    parent: str | None = None
    acked: float = 0.0
    error: str = ""


@dataclass
class Lease:
    """One writer lease held: acquired (monotonic), logged, released (its intent)."""

    token: str
    writer: str
    branch: str
    acquired: float
    logged: float
    read_start: float  # the versions it then saw (``snapshot``) were read after this
    snapshot: set[str] | None
    fence: Any
    released: float | None = None


@dataclass
class History:
    """What the worker logs say happened."""

    commits: dict[tuple[str, int], Commit] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    deleted_at: dict[str, float] = field(default_factory=dict)  # first retention intent
    ops: Counter[str] = field(default_factory=Counter)
    violations: list[dict[str, str]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    fence_api: bool = False

    @property
    def acked(self) -> dict[str, Commit]:
        return {c.vid: c for c in self.commits.values() if c.vid}

    @classmethod
    def parse(cls, events: list[dict[str, Any]]) -> History:
        h = cls()
        for e in events:
            op, phase = e["op"], e["phase"]
            if op == "worker":
                h.fence_api |= bool(e.get("fence_api"))
                if phase == "crash":
                    h.crashes.append(f"{e['w']} crashed: {e['error']}: {e['message']}")
            elif op == "commit":
                h._commit(e)
            elif op == "lease" and phase == "acquired":
                snap = None if e["snapshot"] is None else set(e["snapshot"])
                h.leases[e["token"]] = Lease(e["token"], e["w"], e["branch"], e["acquired"],
                                             e["t"], e["read_start"], snap, e["fence"])  # fmt: skip
                h.ops["lease acquisitions"] += 1
                h.ops["lease waits (LeaseHeld or store error)"] += e["waits"]
            elif op == "lease" and phase == "release" and e["token"] in h.leases:
                h.leases[e["token"]].released = e["t"]
            elif op in ("gc", "repair", "delete"):
                h._maintenance(e)
            elif phase == "error":
                h.ops[f"{op} errors: {e['error']}"] += 1
        for c in h.commits.values():
            h.ops[f"commits {c.outcome}"] += 1
            if c.error:
                h.ops[f"commits {c.outcome}: {c.error.split(':')[0]}"] += 1
        return h

    def _commit(self, e: dict[str, Any]) -> None:
        key = (e["w"], e["seq"])
        if e["phase"] == "intent":
            self.commits[key] = Commit(e["w"], e["seq"], e["branch"], e["token"], e["sha"], e["t"])
        elif (c := self.commits.get(key)) is not None and e["phase"] == "ack":
            c.outcome, c.vid, c.parent, c.acked = "ack", e["vid"], e["parent"], e["t"]
        elif c is not None:
            c.error = f"{e['error']}: {e['message']}"
            c.outcome = ("refused" if e["error"] in REFUSALS else
                         "store_error" if e["store_error"] else "error")  # fmt: skip

    def _maintenance(self, e: dict[str, Any]) -> None:
        op, phase = e["op"], e["phase"]
        kind = {"gc": "gc runs", "repair": "repairs", "delete": "retention deletes"}[op]
        if phase == "intent":
            for vid in e.get("vids", ()):
                self.deleted_at.setdefault(vid, e["t"])
        elif phase == "ack":
            self.ops[f"{kind}: ok"] += 1
            self.ops["versions deleted by retention"] += len(e.get("vids", ()))
        elif op == "delete" and e["conflict"]:
            self.ops[f"{kind}: refused (CommitConflict)"] += 1
        elif e["store_error"] and e["error"] != "PreconditionFailed":
            self.ops[f"{kind}: store error (faults)"] += 1
        elif e["error"] in SAFE_ABORTS or e.get("refused"):
            self.ops[f"{kind}: stopped safely ({e['error']})"] += 1
        else:
            self.ops[f"{kind}: raised {e['error']}"] += 1
            if op != "delete":
                self.violations.append(_v("I5", f"{op} by {e['w']} raised {e['error']}: "
                                                f"{e['message'][:200]}"))  # fmt: skip


def analyze(events: list[dict[str, Any]], obs: Observer, index: Any, repo: Repo,
            chaos: Chaos) -> dict[str, Any]:  # fmt: skip
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
    return {"operations": dict(sorted(h.ops.items())), "violations": violations,
            "violations_by_invariant": dict(sorted(by_inv.items())), "notes": notes,
            "harness_problems": h.crashes, "fence_api": h.fence_api}  # fmt: skip


def check_acked(h: History, index: Any, repo: Repo) -> tuple[list[dict[str, str]], dict[str, str]]:
    """I1: acknowledged and not deleted by retention -> in the index, verifies, loads
    with its hash. The violations, and each version checked -> its problem ("" if none)."""
    found: list[dict[str, str]] = []
    checked: dict[str, str] = {}
    for vid, c in sorted(h.acked.items(), key=lambda vc: vc[1].acked):
        if vid in h.deleted_at:
            continue
        if vid not in index.versions:
            found.append(_v("I1", f"{vid} (acked by {c.writer} seq {c.seq}) is not in the "
                                  "final index", vid))  # fmt: skip
            continue
        checked[vid] = problem = _load_problem(repo, vid, c.sha)
        if problem:
            found.append(_v("I1", f"{vid} (acked by {c.writer}): {problem}", vid))
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
            found.append(_v("I4", f"{vid} in the final index matches no logged commit"))
        elif c.outcome in ("refused", "error"):
            found.append(_v("I4", f"{vid} in the final index, but its commit by {c.writer} "
                                  f"raised {c.error[:200]}"))  # fmt: skip
        if vid in verified:
            continue
        try:
            report = repo.verify(vid)
            problem = "" if report.ok else f"{sorted(report.problems.items())[:1]}"
        except CloudCkptError as e:
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem:
            how = ("deleted by retention, back in the index" if vid in h.deleted_at else
                   f"commit outcome {c.outcome}" if c else "no logged commit")  # fmt: skip
            found.append(
                _v(
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


def check_heads(history: dict[str, list[str]], obs: Observer,
                ops: Counter[str]) -> list[dict[str, str]]:  # fmt: skip
    """I2: each sampled head descends from the one sampled before it."""
    found: list[dict[str, str]] = []
    for branch, heads in history.items():
        ops[f"head moves seen on {branch}"] += len(heads) - 1
        for old, new in itertools.pairwise(heads):
            descends = _descends(new, old, obs.parents)
            if descends is False:
                found.append(_v("I2", f"head of {branch} moved from {old} to {new}, not a "
                                      "descendant"))  # fmt: skip
            elif descends is None:
                ops["head moves with unknown lineage"] += 1
    return found


def check_fences(h: History, history: dict[str, list[str]], obs: Observer,
                 notes: list[dict[str, str]]) -> list[dict[str, str]]:  # fmt: skip
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
                    found.append(_v("I3", f"{vid} ({writer}, fence {fence:g}) follows "
                                          f"{best[1]} (fence {best[0]:g}) on {branch}",
                                    f"fence {vid}"))  # fmt: skip
                if best is None or fence > best[0]:
                    best = (fence, vid)
    return list({v["key"]: v for v in found}.values())


def check_takeovers(h: History, obs: Observer, chaos: Chaos,
                    notes: list[dict[str, str]]) -> list[dict[str, str]]:  # fmt: skip
    """I3 (takeover): no commit is acknowledged to a writer whose lease was taken over
    before that commit started, or before it was published (not among the versions the
    new holder saw right after acquiring, nor sampled earlier)."""
    takeover: dict[str, Lease] = {}  # old token -> the lease that took over from it
    for branch in {x.branch for x in h.leases.values()}:
        held = sorted((x for x in h.leases.values() if x.branch == branch),
                      key=lambda x: x.acquired)  # fmt: skip
        for i, old in enumerate(held):
            new = next((n for n in held[i + 1 :] if old.released is None
                        or old.released > n.acquired), None)  # fmt: skip
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
        unseen = (new.snapshot is not None and vid not in new.snapshot
                  and obs.first_seen.get(vid, float("inf")) >= new.read_start
                  and h.deleted_at.get(vid, float("inf")) >= new.logged)  # fmt: skip
        if later or unseen:
            why = "started" if later else "was published"
            found.append(_v("I3", f"{vid} by {c.writer} {why} after {new.writer} took over "
                                  f"its lease on {c.branch}, and was acknowledged",
                            f"takeover {vid}"))  # fmt: skip
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
    for branch in {x.branch for x in leases.values()}:
        held = sorted((x for x in leases.values() if x.branch == branch), key=lambda x: x.acquired)
        ranks.update({x.token: float(i) for i, x in enumerate(held)})
    return ranks


# -- the report -------------------------------------------------------------------------
def markdown(report: dict[str, Any], command: str) -> str:
    """The report as markdown (violations listed, up to 20 per invariant)."""
    lines = [
        "# Concurrency stress run: committers, gc, repair and retention on one repository",
        "",
        f"`{command}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}): {report['stress_seconds']} s under stress, "
        f"{report['wall_seconds']} s in all. SeaweedFS behind `cloudckpt.testing.faults` "
        f"({report['fault_plan']['rate']:.0%} of requests); fence API in the library: "
        f"{'yes' if report['fence_api'] else 'no'}.",
        "",
        "| operation | count |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in report["operations"].items()),
        f"| workers SIGKILLed (and restarted) | {report['kills']} |",
        f"| committers SIGSTOPped past their lease ttl | {report['stops']} |",
        "",
        "| injected faults | count |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in report["faults"].items()),
        "",
        f"## Violations: {len(report['violations'])}",
        "",
    ]
    for inv, n in report["violations_by_invariant"].items():
        lines.append(f"- **{inv}**: {n}")
        shown = [v for v in report["violations"] if v["invariant"] == inv][:20]
        lines += [f"  - {v['detail']}" for v in shown]
        if n > len(shown):
            lines.append(f"  - ... {n - len(shown)} more in the JSON report")
    if report["harness_problems"]:
        lines += ["", "## Harness problems", "", *(f"- {p}" for p in report["harness_problems"])]
    kinds: dict[str, list[str]] = defaultdict(list)
    for note in report["notes"]:
        kinds[note["kind"]].append(note["detail"])
    lines += ["", "## Notes", ""]
    for kind, details in kinds.items():
        more = f", ... ({len(details)} in all)" if len(details) > 3 else ""
        lines.append(f"- {kind}: {', '.join(details[:3])}{more}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="cloudckpt-concurrency-") as tmp:
            yield Path(tmp)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300.0, help="stress time (after startup)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", default=str(HERE / "RESULTS-concurrency.md"), help="markdown report")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--workdir", help="keep the worker logs here (default: a temporary dir)")
    p.add_argument("--fault-rate", type=float, default=0.04)
    p.add_argument("--ttl", type=float, default=4.0, help="writer lease ttl, seconds")
    p.add_argument("--read-timeout", type=float, default=1.5)
    p.add_argument("--main-committers", type=int, default=3)
    p.add_argument("--b2-committers", type=int, default=2)
    p.add_argument("--keep", type=int, default=3, help="versions per branch retention keeps")
    args = p.parse_args()
    if args.main_committers < 2 or args.b2_committers < 1:
        p.error("need at least 2 committers on main and 1 on b2")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # clients the proxy dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: every process stopped
    command = "python benchmarks/concurrency.py " + " ".join(sys.argv[1:])
    try:
        with _workdir(args.workdir) as workdir:
            report = run(args, workdir)
    except Exception:
        log.exception("the stress run failed")
        return 2
    Path(args.out).write_text(markdown(report, command))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(
        f"{len(report['violations'])} violations {report['violations_by_invariant']}; "
        f"operations {report['operations']}; faults {report['faults']}; "
        f"harness problems: {report['harness_problems'] or 'none'}; wrote {args.out}"
    )
    return 2 if report["harness_problems"] else 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
