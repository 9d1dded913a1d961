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
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloudckpt.repo import Repo
from cloudckpt.testing.faults import FaultPlan, FaultProxy
from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY, SeaweedFS

HERE = Path(__file__).resolve().parent
WORKER = HERE / "concurrency_worker.py"
sys.path.insert(0, str(HERE))
from concurrency_checker import analyze  # noqa: E402
from concurrency_history import Chaos, read_logs  # noqa: E402
from concurrency_observer import Observer  # noqa: E402
from concurrency_report import markdown  # noqa: E402

log = logging.getLogger("concurrency")
FAULT_KINDS = ("slowdown", "internal", "reset", "stall")


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
        cfg = {
            **self.cfg,
            "name": self.name,
            "role": self.role,
            "branch": self.branch,
            "log": str(logfile),
        }
        path = self.workdir / f"{self.name}.json"
        path.write_text(json.dumps(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.workdir / f"{self.name}.err", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(path)],
                env=env,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
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


# -- the run ----------------------------------------------------------------------------
def in_flight_commit(actor: Actor) -> bool:
    """The actor holds its lease and its last event is a commit's intent."""
    tail = actor.tail.poll() if actor.tail else None
    return bool(
        tail and tail.holding and (tail.last["op"], tail.last["phase"]) == ("commit", "intent")
    )


def orchestrate(
    actors: list[Actor], args: argparse.Namespace, deadline: float, rng: random.Random
) -> Chaos:
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
    plan = FaultPlan(
        rate=args.fault_rate,
        seed=args.seed,
        kinds=FAULT_KINDS,
        stall_seconds=args.read_timeout + 1.0,
    )
    actors: list[Actor] = []
    with SeaweedFS(workdir / "weed") as server, FaultProxy(server.endpoint, plan) as proxy:
        uri = server.fresh_uri("concurrency")
        observed = (uri, server.storage_options())
        setup = Repo(uri, server.storage_options())
        setup.commit(
            {"shared": torch.arange(4096, dtype=torch.float32)},
            branch="main",
            step=0,
            meta={"writer": "setup", "seq": 0},
        )
        setup.branch("b2", "main")
        stop_file, go_file = workdir / "STOP", workdir / "GO"
        common = {
            "uri": uri,
            "storage_options": proxy.storage_options({"key": ACCESS_KEY, "secret": SECRET_KEY}),
            "seed": args.seed,
            "stop_file": str(stop_file),
            "go_file": str(go_file),
            "start_timeout": 300,
            "ttl": args.ttl,
            "commits_per_lease": [2, 5],
            "keep": args.keep,
            "store": {
                "connect_timeout": args.read_timeout,
                "read_timeout": args.read_timeout,
                "attempts": 12,
                "total_seconds": 30.0,
            },
        }
        roles = [
            *((f"c-main-{i}", "committer", "main") for i in range(args.main_committers)),
            *((f"c-b2-{i}", "committer", "b2") for i in range(args.b2_committers)),
            ("gc", "gc", None),
            ("repair", "repair", None),
            ("retention", "retention", None),
        ]
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
        seconds=args.seconds,
        stress_seconds=round(t_stress, 1),
        wall_seconds=round(time.monotonic() - t_start, 1),
        seed=args.seed,
        faults=faults,
        fault_plan={
            "rate": plan.rate,
            "kinds": list(plan.kinds),
            "stall_seconds": plan.stall_seconds,
        },
        kills=len(chaos.kills),
        stops=len(chaos.stops),
        stops_detail=chaos.stops,
        worker_exits=[x for a in actors for x in a.exits],
    )
    killed = {k["w"] for k in chaos.kills}
    crashed = [
        f"{n} exited {rc}"
        for a in actors
        for n, rc in a.exits
        if rc not in (0, None) and n not in killed
    ]
    report["harness_problems"] += crashed + [f"{k} x{n}" for k, n in observer.errors.items()]
    return report


def _ready(actor: Actor) -> bool:
    return bool(actor.tail and actor.tail.poll().started)


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
