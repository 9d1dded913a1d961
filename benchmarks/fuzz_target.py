"""The fuzzer's target (benchmarks/fuzz.py): the pristine repository, the sandbox an input
runs in, the operations a user runs and how each outcome is classified.

The pristine repository (file://, built once per version of the library's sources):

* branch ``main``: three versions saved by a ``CheckpointManager`` (a small MLP, AdamW
  state, the RNG states, an ``extra``), under its writer lease (``leases/main.json``,
  released at ``close()``); tag ``release`` on the second;
* branch ``hf``: two versions committed by ``CloudCheckpointCallback`` during a real
  Hugging Face ``Trainer`` run of a tiny GPT-2;
* a Lightning pointer ``last.ckpt`` beside the repository (the layout of
  ``CloudCheckpointIO``: ``<checkpoint dir>/.cloudckpt``) naming the tagged version.

A sandbox is ``<workdir>/w<k>/a/b/c/d/e/f`` holding ``ckpt/`` (the pointer and the
repository), ``out/export`` and ``out/hf`` (the output directories the user chose) and
``cwd/`` (the process's working directory): paths climbing up to six levels out of any of
them still land in the sandbox, where the snapshot after each operation sees them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cloudckpt
from cloudckpt import versions
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint, LeaseHeld

ROOT = Path(__file__).resolve().parent.parent
NEST = ("a", "b", "c", "d", "e", "f")
#: Every pristine object's modification time (2020-09-13): the lease is long expired.
FIXED_MTIME = 1_600_000_000
TAG = "release"
REPO_REL = "ckpt/.cloudckpt"
POINTER_REL = "ckpt/last.ckpt"
EXPORT_NAME = "model.safetensors"


# -- fingerprints --------------------------------------------------------------------
def fingerprint(obj: Any) -> str:
    """A hash of a value's exact types and bits (tensors, arrays, floats bit for bit)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, np.ndarray):
        h.update(f"N{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, np.generic):
        h.update(f"n{x.dtype.str}".encode() + x.tobytes())
    elif isinstance(x, bool) or x is None:
        h.update(repr(x).encode())
    elif type(x) is int:
        h.update(f"i{x}".encode())
    elif type(x) is float:
        h.update(b"f" + struct.pack("<d", x))
    elif type(x) is str:
        h.update(b"s%d:" % len(x) + x.encode("utf-8", "surrogatepass"))
    elif type(x) is bytes:
        h.update(b"y%d:" % len(x) + x)
    elif isinstance(x, dict) and type(x) in (dict,):
        h.update(b"{%d" % len(x))
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif type(x) in (list, tuple, torch.Size):
        h.update(f"{type(x).__name__}[{len(x)}".encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, (torch.dtype, torch.device)):
        h.update(f"{type(x).__name__}:{x}".encode())
    else:
        h.update(f"?{type(x).__qualname__}:{x!r}".encode())


# -- the pristine repository ---------------------------------------------------------
def main_objects() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer of branch ``main`` (fresh, seeded: what a restore starts
    from)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def hf_trainer(output_dir: Path, train: bool = False) -> Any:
    """A Trainer of a tiny GPT-2 (as tests/child_hf.py builds one, smaller)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    data = torch.randint(0, 32, (16, 9), generator=torch.Generator().manual_seed(3))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": data[i], "labels": data[i]}

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=2,
        disable_tqdm=True,
        save_strategy="steps" if train else "no",
    )
    return Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens())


def build(dest: Path) -> dict[str, Any]:
    """Build the pristine repository under ``dest`` (``dest/ckpt/...``) and compute what
    each operation must return on it; returns that metadata (also in ``dest/meta.json``)."""
    from cloudckpt.integrations import pointer
    from cloudckpt.integrations.transformers import CloudCheckpointCallback

    logging.disable(logging.WARNING)
    shutil.rmtree(dest, ignore_errors=True)
    repo_dir = dest / REPO_REL
    repo_dir.mkdir(parents=True)
    uri = repo_dir.as_uri()
    random.seed(0)
    np.random.seed(0)
    model, opt = main_objects()
    mgr = cloudckpt.CheckpointManager(uri, save_every_steps=1)
    mgr.restore(model=model, optimizer=opt, extra={"seen": 0})
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for step in (1, 2, 3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step(step, metrics={"loss": loss.item()}, extra={"seen": step * 16, "tag": "run"})
    mgr.close()
    repo = cloudckpt.Repo(uri)
    main = [v.id for v in reversed(repo.log("main"))]
    repo.tag(TAG, main[1])
    trainer = hf_trainer(dest / "hf-train", train=True)
    trainer.add_callback(CloudCheckpointCallback(uri, branch="hf"))
    trainer.train()
    hf = [v.id for v in reversed(repo.log("hf"))]
    (dest / POINTER_REL).write_bytes(pointer.Pointer(str(repo_dir), main[1]).dumps())
    shutil.rmtree(dest / "hf-train")
    meta: dict[str, Any] = {"main": main, "hf": hf, "pointer_version": main[1], "uri": uri}
    meta["expect"] = _expectations(dest, repo_dir, main, hf)
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _expectations(dest: Path, repo_dir: Path, main: list[str], hf: list[str]) -> dict[str, Any]:
    """What each operation returns on the pristine repository, for every version it may
    legitimately end on (a restore falls back to older versions; a rewritten index may
    name another version): the fingerprints the fuzzer accepts as loaded correctly."""
    from cloudckpt.integrations.transformers import CloudCheckpointCallback

    repo = cloudckpt.Repo(repo_dir.as_uri())
    load = {fingerprint(repo.load(v)) for v in main + hf}
    export = set()
    for v in main + hf:
        export.add(fingerprint(_tensors(repo.load(v))))
    restore, hf_files = set(), set()
    scratch = dest / "scratch"
    for branch, vids in (("main", main), ("hf", hf)):
        for vid in vids:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(repo_dir, scratch / "repo")
            uri = (scratch / "repo").as_uri()
            versions.update(
                cloudckpt.Repo(uri).store, lambda ix, b=branch, v=vid: ix.branches.update({b: v})
            )
            if branch == "main":
                restore.add(restore_fingerprint(*_restore(uri)))
            else:
                out = scratch / "out"
                path = CloudCheckpointCallback(uri, branch="hf").resume(hf_trainer(out))
                hf_files.add(files_fingerprint(Path(path)))
    shutil.rmtree(scratch)
    return {
        "load": sorted(load),
        "export": sorted(export),
        "restore": sorted(restore),
        "hf": sorted(hf_files),
    }


def _tensors(state: Any) -> dict[str, torch.Tensor]:
    """What a safetensors export holds: every tensor and numpy array, by dotted path."""
    from cloudckpt.tree import map_arrays

    found: dict[str, torch.Tensor] = {}

    def keep(value: Any, path: str) -> Any:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            found[path] = value
        return value

    map_arrays(state, keep)
    return dict(sorted(found.items()))


def _restore(uri: str) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    """``restore`` with the manager's defaults, except that a lease that looks live fails
    fast (LeaseHeld) instead of being waited out: that wait is designed, bounded by the
    lease's own ttl (at most ``lease.MAX_TTL``, an hour), and would stall the run."""
    model, opt = main_objects()
    fail_fast = "lease_wait" in inspect.signature(cloudckpt.CheckpointManager).parameters
    mgr = cloudckpt.CheckpointManager(uri, **({"lease_wait": False} if fail_fast else {}))
    try:
        resumed = mgr.restore(model=model, optimizer=opt)
    finally:
        mgr.close()
    return resumed, model, opt


def restore_fingerprint(resumed: Any, model: torch.nn.Module, opt: Any) -> str:
    vid = resumed.version.id if resumed.version is not None else None
    return fingerprint(
        (
            vid,
            resumed.step,
            resumed.epoch,
            resumed.extra,
            model.state_dict(),
            opt.state_dict(),
            torch.get_rng_state(),
            random.getstate(),
            np.random.get_state(),
        )
    )


def files_fingerprint(directory: Path) -> str:
    """The names and bytes of the files under ``directory``."""
    found = sorted(
        (str(p.relative_to(directory)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in directory.rglob("*")
        if p.is_file()
    )
    return fingerprint(found)


# -- the sandbox ---------------------------------------------------------------------
Listing = dict[str, Any]  # relative path -> (size, mtime_ns) for a file, "d" for a directory


@dataclass
class Sandbox:
    """One worker's copy of the pristine repository, its output directories, and the
    snapshots that find writes outside them."""

    top: Path  # everything under it is watched
    deep: Path
    pristine: dict[str, bytes] = field(default_factory=dict)  # path under deep -> bytes
    baseline: Listing = field(default_factory=dict)

    @property
    def repo(self) -> Path:
        return self.deep / REPO_REL

    @property
    def uri(self) -> str:
        return self.repo.as_uri()

    @property
    def out(self) -> Path:
        return self.deep / "out"

    @classmethod
    def create(cls, top: Path, source: Path) -> Sandbox:
        from cloudckpt.integrations import pointer

        shutil.rmtree(top, ignore_errors=True)
        deep = top.joinpath(*NEST)
        box = cls(top, deep)
        for p in sorted((source / "ckpt").rglob("*")):
            if p.is_file():
                box.pristine[str(p.relative_to(source))] = p.read_bytes()
        meta = json.loads((source / "meta.json").read_text())
        # What CloudCheckpointIO.save_checkpoint writes for a local path: the plain path.
        box.pristine[POINTER_REL] = pointer.Pointer(str(box.repo), meta["pointer_version"]).dumps()
        for d in ("out/export", "out/hf", "cwd"):
            (deep / d).mkdir(parents=True)
        for rel, data in box.pristine.items():
            box.write(rel, data)
        box.baseline = box.snapshot()
        return box

    def write(self, rel: str, data: bytes, mtime: float | None = FIXED_MTIME) -> None:
        path = self.deep / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    def snapshot(self) -> Listing:
        found: Listing = {}
        stack = [(str(self.top), "")]
        while stack:
            path, rel = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for e in entries:
                name = rel + e.name
                try:
                    if e.is_dir(follow_symlinks=False):
                        found[name] = "d"
                        stack.append((e.path, name + "/"))
                    else:
                        st = e.stat(follow_symlinks=False)
                        found[name] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    continue
        return found

    def rel_top(self, path: Path) -> str:
        return os.path.relpath(path, self.top)

    def reset(self) -> None:
        """Back to the pristine state: outputs emptied, writes undone, objects restored."""
        now = self.snapshot()
        for rel in sorted(set(now) - set(self.baseline), key=len, reverse=True):
            p = self.top / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        deep_rel = self.rel_top(self.deep)
        for rel, data in self.pristine.items():
            key = os.path.normpath(os.path.join(deep_rel, rel))
            if now.get(key) != self.baseline.get(key) or not (self.top / key).is_file():
                self.write(rel, data)
        for d in ("out/export", "out/hf", "cwd"):
            (self.deep / d).mkdir(parents=True, exist_ok=True)


# -- operations ----------------------------------------------------------------------
#: Replays add the last frames of each unexpected exception to its message.
TRACEBACKS = False


class OpTimeout(BaseException):
    """An operation ran past its time limit (a BaseException: no library handler eats it)."""


@dataclass
class Outcome:
    cls: str  # ok | corrupt | notfound | leaseheld | other
    why: str = ""  # for other: the exception type, "wrong result: ..." or "hang"
    where: str = ""  # the innermost cloudckpt frame (file:line), else the innermost frame
    message: str = ""
    seconds: float = 0.0
    outside: list[str] = field(default_factory=list)


@dataclass
class Context:
    box: Sandbox
    meta: dict[str, Any]
    trainer: Any = None

    @property
    def expect(self) -> dict[str, set[str]]:
        return self.meta["_sets"]


def load_context(box: Sandbox, meta: dict[str, Any], with_hf: bool = True) -> Context:
    meta["_sets"] = {k: set(v) for k, v in meta["expect"].items()}
    return Context(box, meta, hf_trainer(box.out / "hf") if with_hf else None)


def where(e: BaseException) -> str:
    """``file:line`` of the innermost frame in the library (else the innermost frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f"{os.sep}cloudckpt{os.sep}" in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    rel = os.path.relpath(frame.filename, ROOT) if frame in ours else frame.filename
    return f"{rel}:{frame.lineno}"


def innermost(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


#: What a version id and a branch name may be (the rules ``cloudckpt.schema`` documents:
#: nothing that could name another object or climb out of a directory).
_VID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _vid(s: Any) -> bool:
    return isinstance(s, str) and bool(_VID.fullmatch(s))


def _name(s: Any) -> bool:
    return (
        isinstance(s, str)
        and 0 < len(s) <= 200
        and s.isprintable()
        and not any(c.isspace() or c == "\\" for c in s)
        and not any(part in ("", ".", "..") for part in s.split("/"))
    )


def _finite(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _count(x: Any) -> bool:
    return type(x) is int and x >= 0


def bad_row(v: Any) -> str | None:
    """What is wrong with a version row a reader returned (None: well-typed): types, and
    ids and names that could name another object."""
    if not isinstance(v, cloudckpt.Version):
        return f"a {type(v).__name__}, not a Version"
    checks = {
        "id": _vid(v.id),
        "branch": _name(v.branch),
        "parent": v.parent is None or _vid(v.parent),
        "step": v.step is None or type(v.step) is int,
        "metrics": isinstance(v.metrics, dict)
        and all(isinstance(k, str) and type(m) in (int, float) for k, m in v.metrics.items()),
        "message": v.message is None or isinstance(v.message, str),
        "created": _finite(v.created),
        "seconds": _finite(v.seconds),
        "logical_bytes": _count(v.logical_bytes),
        "stored_bytes": _count(v.stored_bytes),
        "uploaded_bytes": _count(v.uploaded_bytes),
        "meta": isinstance(v.meta, dict),
        "fence": v.fence is None or _count(v.fence),
    }
    wrong = [k for k, ok in checks.items() if not ok]
    if wrong:
        return f"row {str(v.id)[:40]!r} has ill-typed {', '.join(wrong)}: " + ", ".join(
            f"{k}={getattr(v, k)!r:.40}" for k in wrong
        )
    return None


def op_log(ctx: Context, ref: str) -> tuple[str, str]:
    rows = cloudckpt.Repo(ctx.box.uri).log(ref)
    for row in rows:
        problem = bad_row(row)
        if problem:
            return "wrong", problem
    return "ok", ""


def op_load(ctx: Context, ref: str) -> tuple[str, str]:
    state = cloudckpt.Repo(ctx.box.uri).load(ref)
    if fingerprint(state) in ctx.expect["load"]:
        return "ok", ""
    return "wrong", "the state equals no pristine version's"


def op_verify(ctx: Context, ref: str) -> tuple[str, str]:
    report = cloudckpt.Repo(ctx.box.uri).verify(ref)
    return ("ok", "") if report.ok else ("reported", "; ".join(report.problems)[:300])


def op_export(ctx: Context, ref: str) -> tuple[str, str]:
    from safetensors.torch import load

    dest = ctx.box.out / "export" / EXPORT_NAME
    cloudckpt.Repo(ctx.box.uri).export(ref, str(dest))
    if fingerprint(dict(sorted(load(dest.read_bytes()).items()))) in ctx.expect["export"]:
        return "ok", ""
    return "wrong", "the exported tensors equal no pristine version's"


def op_restore(ctx: Context, ref: str) -> tuple[str, str]:
    resumed, model, opt = _restore(ctx.box.uri)
    if resumed.version is None:
        return "none", "restore found no version: a fresh run"
    if restore_fingerprint(resumed, model, opt) in ctx.expect["restore"]:
        return "ok", ""
    vid = resumed.version.id if resumed.version else None
    return "wrong", f"restored objects equal no pristine version's (resumed {vid!r:.60})"


def op_lightning(ctx: Context, ref: str) -> tuple[str, str]:
    from cloudckpt.integrations.lightning import CloudCheckpointIO

    path = ctx.box.deep / POINTER_REL
    state = CloudCheckpointIO().load_checkpoint(str(path))
    named = _pointer_repo(path)
    if named is not None and named != os.path.realpath(ctx.box.repo):
        return "wrong", f"loaded from another repository: {named!r:.80}"
    if fingerprint(state) in ctx.expect["load"]:
        return "ok", ""
    return "wrong", "the state equals no pristine version's"


def _pointer_repo(path: Path) -> str | None:
    """The local directory the pointer at ``path`` names, resolved (None: unreadable)."""
    try:
        named = json.loads(path.read_bytes())["repo"]
        named = named.removeprefix("file://") if isinstance(named, str) else None
        return os.path.realpath(named) if named is not None else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def op_hf(ctx: Context, ref: str) -> tuple[str, str]:
    from cloudckpt.integrations.transformers import CloudCheckpointCallback

    out = ctx.box.out / "hf"
    found = CloudCheckpointCallback(ctx.box.uri, branch="hf").resume(ctx.trainer)
    if found is None:
        return "none", "resume found no checkpoint (fresh run)"
    path = Path(found)
    if path.parent != out or not re.fullmatch(r"checkpoint-\d+", path.name):
        return "wrong", f"laid out at {found!r:.120}, not <output_dir>/checkpoint-<step>"
    stray = [p for p in out.iterdir() if p != path]
    if stray:
        return "wrong", f"also wrote {stray[0].name!r:.60} in the output directory"
    if files_fingerprint(path) in ctx.expect["hf"]:
        return "ok", ""
    return "wrong", "the files laid out equal no pristine version's"


OPS: dict[str, Callable[[Context, str], tuple[str, str]]] = {
    "log": op_log,
    "load": op_load,
    "verify": op_verify,
    "export": op_export,
    "restore": op_restore,
    "lightning": op_lightning,
    "hf": op_hf,
}
#: Where an operation may write (under the sandbox's ``deep``): anything else it writes
#: is a write outside its target.
WRITES = {"restore": (REPO_REL,), "export": ("out/export",), "hf": ("out/hf",)}


def _alarm(signum: int, frame: Any) -> None:
    raise OpTimeout()


def run_op(
    ctx: Context,
    op: str,
    ref: str,
    limit: float,
    before: Listing,
    *,
    accept_notfound: bool,
    accept_leaseheld: bool,
) -> tuple[Outcome, Listing]:
    """Run one operation under a time limit; classify it; find its writes outside the
    target (``before``: the sandbox's listing before it). Returns the outcome and the
    listing after it."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    t0 = time.perf_counter()
    try:
        try:
            verdict, detail = OPS[op](ctx, ref)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if verdict == "ok":
            out = Outcome("ok")
        elif verdict == "reported":
            out = Outcome("corrupt", "VerifyReport", message=detail)
        elif verdict == "none":
            out = (
                Outcome("notfound", "nothing found", message=detail)
                if accept_notfound
                else Outcome("other", "nothing found", f"op {op}", detail)
            )
        else:
            out = Outcome("other", "wrong result", f"op {op}", detail)
    except OpTimeout as e:  # where the main thread was, and what every thread was doing
        out = Outcome("other", "hang", where(e), f"ran past {limit:.0f}s; {_threads()}")
    except CorruptCheckpoint as e:
        out = Outcome("corrupt", type(e).__name__, where(e), str(e)[:300])
    except CheckpointNotFound as e:
        out = Outcome(
            "notfound" if accept_notfound else "other", type(e).__name__, where(e), str(e)[:300]
        )
    except LeaseHeld as e:
        out = Outcome(
            "leaseheld" if accept_leaseheld else "other", type(e).__name__, where(e), str(e)[:300]
        )
    except Exception as e:
        out = Outcome(
            "other", type(e).__name__, where(e), f"{str(e)[:300]} [raised at {innermost(e)}]"
        )
        if TRACEBACKS:
            out.message += "\n" + "".join(traceback.format_exception(e)[-12:])
    out.seconds = time.perf_counter() - t0
    after = ctx.box.snapshot()
    out.outside = writes_outside(ctx.box, before, after, op)
    return out, after


def _threads() -> str:
    """The innermost library frame (else the innermost frame) of every thread."""
    import sys

    found = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)
        ours = [f for f in stack if f"{os.sep}cloudckpt{os.sep}" in f.filename]
        f = (ours or stack)[-1]
        found.append(f"thread {ident}: {Path(f.filename).name}:{f.lineno} {f.name}")
    return "; ".join(found)[:1500]


def writes_outside(box: Sandbox, before: Listing, after: Listing, op: str) -> list[str]:
    deep_rel = box.rel_top(box.deep)
    allowed = [os.path.normpath(os.path.join(deep_rel, w)) for w in WRITES.get(op, ())]
    changed = [p for p in set(before) | set(after) if before.get(p) != after.get(p)]
    return sorted(
        p for p in changed if not any(p == a or p.startswith(a + os.sep) for a in allowed)
    )
