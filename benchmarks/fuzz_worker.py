"""A fuzzer worker process (benchmarks/fuzz.py): holds a sandbox with a copy of the
pristine repository, and for each input number mutates one object, runs the operations
that read it, classifies each outcome and puts the sandbox back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import resource
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: How often each kind of object is the one mutated.
WEIGHTS = {"versions": 30, "manifest": 30, "blob": 12, "lease": 10, "pointer": 10, "marker": 8}
#: Bytes of address space a worker may map beyond what it holds after its setup: a
#: hostile object that makes the library allocate more fails with MemoryError (counted
#: as other) instead of taking the machine down.
HEADROOM = 6 << 30


class Target:
    """The objects of the pristine repository by kind, which versions each one serves, and
    the names ``wrong_id`` uses."""

    def __init__(self, box: Any, meta: dict[str, Any]) -> None:
        from fuzz_mutate import Known
        from fuzz_target import POINTER_REL, REPO_REL, TAG

        self.kind: dict[str, str] = {}
        self.readers: dict[str, set[str]] = {}  # object -> the version ids it serves
        main, hf = meta["main"], meta["hf"]
        #: The refs a user would name each version by, and the operations that read it.
        self.refs = {main[-1]: "main", main[1]: TAG, hf[-1]: "hf"}
        users: dict[str, set[str]] = {}  # blob digest -> the versions reading it
        for rel in sorted(box.pristine):
            key = rel.removeprefix(REPO_REL + "/")
            name = key.rsplit("/", 1)[-1].removesuffix(".json")
            if rel.endswith(".lock"):
                continue  # the local store's lock files, not objects
            if rel == POINTER_REL:
                self.kind[rel], self.readers[rel] = "pointer", set()
            elif key == "versions.json":
                self.kind[rel], self.readers[rel] = "versions", set()
            elif key.startswith("manifests/"):
                self.kind[rel], self.readers[rel] = "manifest", {name}
                for entry in json.loads(box.pristine[rel])["tensors"]:
                    for chunk in entry.get("chunks", []):
                        users.setdefault(chunk[0], set()).add(name)
            elif key.startswith("published/"):
                self.kind[rel], self.readers[rel] = "marker", {name}
            elif key.startswith("leases/"):
                self.kind[rel], self.readers[rel] = "lease", set()
            elif key.startswith("blobs/"):
                self.kind[rel] = "blob"
        for rel, kind in self.kind.items():
            if kind == "blob":
                self.readers[rel] = users.get(rel.rsplit("/", 1)[-1], set())
        self.by_kind = {k: sorted(r for r, v in self.kind.items() if v == k) for k in WEIGHTS}
        self.blobs = [box.pristine[r] for r in self.by_kind["blob"]]
        index = json.loads(box.pristine[f"{REPO_REL}/versions.json"])
        digests = sorted(r.rsplit("/", 1)[-1] for r in self.by_kind["blob"])
        self.known = Known(
            {
                "version": sorted(main + hf),
                "branch": sorted(index["branches"]),
                "tag": sorted(index["tags"]),
                "digest": digests,
            },
            str(box.top),
        )

    def plan(self, rel: str, rng: random.Random, hf_rate: float) -> list[tuple[str, str]]:
        """The operations (and refs) that read this object."""
        from fuzz_target import TAG

        kind = self.kind[rel]
        if kind == "versions":
            ops = [
                ("log", "main"),
                ("load", "main"),
                ("load", TAG),
                ("verify", "main"),
                ("export", "main"),
                ("restore", "main"),
                ("lightning", ""),
                ("load", "hf"),
            ]
            return ops + ([("hf", "hf")] if rng.random() < hf_rate else [])
        if kind == "lease":
            return [("restore", "main")]
        if kind == "pointer":
            return [("lightning", "")]
        ops: list[tuple[str, str]] = []
        for vid in sorted(self.readers[rel]):
            ref = self.refs.get(vid, vid)
            ops += [("load", ref), ("verify", ref)]
            ops += {
                "main": [("export", "main"), ("restore", "main")],
                TAG: [("lightning", "")],
                "hf": [("hf", "hf")],
            }.get(ref, [])
        return list(dict.fromkeys(ops))


def cross_check(results: list[dict[str, Any]]) -> None:
    """``verify`` must agree with ``load`` of the same ref in the same input."""
    loads = {r["ref"]: r for r in results if r["op"] == "load"}
    for r in results:
        load = loads.get(r["ref"])
        if r["op"] != "verify" or load is None:
            continue
        passed = r["cls"] == "ok"
        if passed and load["cls"] == "corrupt":
            why, detail = "verify passed", f"but load raised {load['why']}: {load['message']}"
        elif passed and load["why"] == "wrong result":
            why, detail = "verify passed", "but the version loads wrong (see load)"
        elif r["cls"] == "corrupt" and load["cls"] == "ok":
            why, detail = "verify false alarm", f"{r['message']} (yet it loads correctly)"
        else:
            continue
        r.update(cls="other", why=why, where="op verify", message=detail[:300])


def run_input(ctx: Any, target: Target, seed: int, n: int, opts: dict[str, Any]) -> dict[str, Any]:
    from fuzz_mutate import mutate
    from fuzz_target import run_op

    t0 = time.perf_counter()
    rng = random.Random(f"{seed}:{n}")
    kinds = [k for k in WEIGHTS if target.by_kind[k]]
    kind = rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0]
    rel = rng.choice(target.by_kind[kind])
    m = mutate(ctx.box.pristine[rel], rng, target.known, target.blobs if kind == "blob" else [])
    if m.data is None:
        (ctx.box.deep / rel).unlink()
    else:
        ctx.box.write(rel, m.data, mtime=None)
    results = []
    listing = ctx.box.snapshot()
    for op, ref in target.plan(rel, rng, opts["hf_rate"]):
        out, listing = run_op(
            ctx,
            op,
            ref,
            opts["op_limit"],
            listing,
            accept_notfound=kind in ("versions", "pointer"),
            accept_leaseheld=kind == "lease",
        )
        results.append({"op": op, "ref": ref, **asdict(out)})
        if out.why == "hang":
            break  # the process may hold a stuck thread: it is replaced after this input
    cross_check(results)
    ctx.box.reset()
    return {
        "n": n,
        "object": kind,
        "rel": rel,
        "mutation": m.kind,
        "detail": m.detail[:300],
        "ops": results,
        "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "seconds": time.perf_counter() - t0,
        "hang": any(r["why"] == "hang" for r in results),
    }


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def setup(
    workdir: Path, pristine: Path, wid: int | str, with_hf: bool = True
) -> tuple[Any, Target]:
    import torch
    from fuzz_target import Sandbox, load_context

    quiet()
    torch.set_num_threads(1)
    box = Sandbox.create(workdir / f"w{wid}", pristine)
    os.chdir(box.deep / "cwd")
    meta = json.loads((pristine / "meta.json").read_text())
    ctx = load_context(box, meta, with_hf)
    return ctx, Target(box, meta)


def _limit_memory() -> None:
    with open("/proc/self/statm") as f:
        vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vsz + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def serve(conn: Any, workdir: str, wid: int) -> None:
    """The worker's loop. ``("build", dest)`` builds the pristine repository there;
    ``("setup", pristine)`` makes this worker's sandbox; ``("input", seed, n, opts)`` ->
    a record; ``("stop",)`` ends. It starts by importing everything, before any message,
    so that workers import while one of them builds."""
    quiet()
    import fuzz_target  # noqa: F401
    import transformers  # noqa: F401

    import cloudckpt.integrations.lightning  # noqa: F401

    ctx = target = None
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "build":
            conn.send(_build(msg[1]))
            continue
        if msg[0] == "setup":
            ctx, target = setup(Path(workdir), Path(msg[1]), wid)
            _limit_memory()
            conn.send(("ready", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
            continue
        _, seed, n, opts = msg
        record = run_input(ctx, target, seed, n, opts)
        conn.send(("done", record))
        if record["hang"]:
            return


def _build(dest: str) -> tuple[str, str]:
    from fuzz_target import build

    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            build(Path(dest))
        return ("built", "")
    except Exception:
        import traceback

        return ("failed", traceback.format_exc())
