"""cloudckpt against the alternatives, side by side on one local S3 server.

    python benchmarks/compare.py [--preset gpt2|small] [--repeats 3] [--only a,b] [--out DIR]

Starts a local SeaweedFS, builds a GPT-2-small training state (124M parameters + AdamW
after a real step, ~1.5 GB fp32; ``--preset small`` for a quick run) and measures, with
the contenders alternated run by run, the median over the repetitions of: save wall time
to a durable, loadable checkpoint; restore wall time into the model and optimizer; bytes
stored; peak extra RSS during save and restore; and, for async modes, how long the
training loop is blocked. Ceilings: one in-memory copy of the state, and a raw boto3
multipart upload and download of the same number of bytes. Then the incremental
scenario: fine-tuning with the embeddings and the first half of the blocks frozen.

Writes RESULTS.md, results.json and results.png to benchmarks/ (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from cloudckpt import CheckpointManager, Repo
from cloudckpt.repo import RepoOptions
from cloudckpt.store import StoreOptions
from cloudckpt.testing.gpt import GPT, benchmark_model
from cloudckpt.testing.local_s3 import SeaweedFS

HERE = Path(__file__).resolve().parent
MB = 1e6


# -- measuring ---------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


class CPUTime:
    """CPU-seconds (user + system) that a process spends inside the block."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid)
        self.seconds = 0.0

    def _now(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def __enter__(self) -> CPUTime:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._now() - self._start


@dataclass
class Run:
    save: float = 0.0
    restore: float = 0.0
    blocked: float | None = None
    stored: int = 0
    save_rss: int = 0
    restore_rss: int = 0
    save_cpu: float = 0.0  # this process
    save_server_cpu: float = 0.0  # the S3 server
    restore_cpu: float = 0.0
    restore_server_cpu: float = 0.0


@dataclass
class Contender:
    name: str
    save: Callable[[str], float | None]  # uri -> blocking seconds (async) or None
    restore: Callable[[str], None]
    runs: list[Run] = field(default_factory=list)
    error: str | None = None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def med(c: Contender, field_name: str) -> float:
    """The median of one measurement over a contender's runs."""
    return median([getattr(r, field_name) for r in c.runs])


def spread(c: Contender, field_name: str) -> str:
    """The median and, over several runs, the range: ``2.45 (2.31-3.02)``."""
    values = [getattr(r, field_name) for r in c.runs]
    if len(values) < 2:
        return f"{median(values):.2f}"
    return f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


# -- the training state --------------------------------------------------------------------
def build(preset: str) -> tuple[GPT, torch.optim.Optimizer]:
    return benchmark_model(preset)


def state_of(model: GPT, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def logical_bytes(model: GPT, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    seen = {t.data_ptr(): t.nbytes for t in tensors}
    return sum(seen.values())


# -- the contenders ------------------------------------------------------------------------
def contenders(model: GPT, opt: torch.optim.Optimizer, s3: Any, endpoint: str) -> list[Contender]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = s3
    transfer = TransferConfig()

    def split(uri: str) -> tuple[str, str]:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return bucket, key

    def load_into(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])

    # cloudckpt -------------------------------------------------------------------
    def cloud_save(uri: str) -> None:
        Repo(uri).commit(state_of(model, opt))

    def cloud_restore(uri: str) -> None:
        Repo(uri).load(into={"model": model, "optimizer": opt})

    s3fs_only = RepoOptions(store=StoreOptions(fast_path=False))

    def cloud_s3fs_save(uri: str) -> None:
        Repo(uri, options=s3fs_only).commit(state_of(model, opt))

    def cloud_s3fs_restore(uri: str) -> None:
        Repo(uri, options=s3fs_only).load(into={"model": model, "optimizer": opt})

    managers: dict[str, CheckpointManager] = {}

    def cloud_async_save(uri: str) -> float:
        mgr = CheckpointManager(uri, async_save=True, exclusive=False, health=None)
        managers[uri] = mgr
        mgr.objects = {"model": model, "optimizer": opt}  # registered without a restore
        t0 = time.perf_counter()
        mgr.save("benchmark")
        blocked = time.perf_counter() - t0
        mgr.wait()
        return blocked

    # torch.save + boto3 --------------------------------------------------------------
    def torch_boto3_save(uri: str) -> None:
        buf = io.BytesIO()
        torch.save(state_of(model, opt), buf)
        buf.seek(0)
        client.upload_fileobj(buf, *split(uri), Config=transfer)

    def torch_boto3_restore(uri: str) -> None:
        buf = io.BytesIO()
        client.download_fileobj(*split(uri), buf, Config=transfer)
        buf.seek(0)
        load_into(torch.load(buf, weights_only=True))

    # the textbook: torch.save of each state dict into a ZIP_DEFLATED zipfile ---------
    def textbook_save(uri: str) -> None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, sd in state_of(model, opt).items():
                part = io.BytesIO()
                torch.save(sd, part)
                z.writestr(f"{name}.pt", part.getvalue())
        buf.seek(0)
        client.upload_fileobj(buf, *split(uri), Config=transfer)

    def textbook_restore(uri: str) -> None:
        buf = io.BytesIO()
        client.download_fileobj(*split(uri), buf, Config=transfer)
        with zipfile.ZipFile(buf) as z:
            load_into(
                {
                    n: torch.load(io.BytesIO(z.read(f"{n}.pt")), weights_only=True)
                    for n in ("model", "optimizer")
                }
            )

    # s3torchconnector ---------------------------------------------------------------
    def s3tc() -> Any:
        from s3torchconnector import S3Checkpoint
        from s3torchconnector._s3client import S3ClientConfig

        return S3Checkpoint(
            region="us-east-1",
            endpoint=endpoint,
            s3client_config=S3ClientConfig(force_path_style=True),
        )

    def s3tc_save(uri: str) -> None:
        with s3tc().writer(uri) as w:
            torch.save(state_of(model, opt), w)

    def s3tc_restore(uri: str) -> None:
        with s3tc().reader(uri) as r:
            load_into(torch.load(r, weights_only=True))

    # torch.distributed.checkpoint with fsspec (s3fs) ------------------------------------
    def dcp_state() -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optimizer": osd}

    def dcp_save(uri: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dcp.save(dcp_state(), storage_writer=FsspecWriter(uri))

    def dcp_async_save(uri: str) -> float:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        t0 = time.perf_counter()
        future = dcp.async_save(dcp_state(), storage_writer=FsspecWriter(uri))
        blocked = time.perf_counter() - t0
        future.result()
        return blocked

    def dcp_restore(uri: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = dcp_state()
        dcp.load(sd, storage_reader=FsspecReader(uri))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])

    # ceilings --------------------------------------------------------------------------
    payload = {"bytes": b""}

    def copy_save(uri: str) -> None:
        [t.clone() for t in state_tensors(model, opt)]

    def raw_save(uri: str) -> None:
        if len(payload["bytes"]) != logical_bytes(model, opt):
            payload["bytes"] = os.urandom(logical_bytes(model, opt))
        client.upload_fileobj(io.BytesIO(payload["bytes"]), *split(uri), Config=transfer)

    def raw_restore(uri: str) -> None:
        client.download_fileobj(*split(uri), io.BytesIO(), Config=transfer)

    del boto3
    return [
        Contender("cloudckpt", cloud_save, cloud_restore),
        Contender("cloudckpt async", cloud_async_save, cloud_restore),
        Contender("cloudckpt (s3fs only)", cloud_s3fs_save, cloud_s3fs_restore),
        Contender("torch.save + boto3", torch_boto3_save, torch_boto3_restore),
        Contender("textbook ZIP_DEFLATED", textbook_save, textbook_restore),
        Contender("s3torchconnector", s3tc_save, s3tc_restore),
        Contender("DCP fsspec", dcp_save, dcp_restore),
        Contender("DCP fsspec async", dcp_async_save, dcp_restore),
        Contender("ceiling: memory copy", copy_save, lambda uri: None),
        Contender("ceiling: boto3 raw bytes", raw_save, raw_restore),
    ]


def state_tensors(model: GPT, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    return out + [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def stored_bytes(client: Any, uri: str) -> int:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def delete_prefix(client: Any, uri: str) -> None:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def measure(c: Contender, uri: str, client: Any, server_pid: int | None) -> Run:
    run = Run()
    with PeakRSS() as rss, CPUTime() as cpu, CPUTime(server_pid) as server:
        t0 = time.perf_counter()
        run.blocked = c.save(uri)
        run.save = time.perf_counter() - t0
    run.save_rss, run.save_cpu, run.save_server_cpu = rss.peak, cpu.seconds, server.seconds
    run.stored = stored_bytes(client, uri)
    with PeakRSS() as rss, CPUTime() as cpu, CPUTime(server_pid) as server:
        t0 = time.perf_counter()
        c.restore(uri)
        run.restore = time.perf_counter() - t0
    run.restore_rss, run.restore_cpu = rss.peak, cpu.seconds
    run.restore_server_cpu = server.seconds
    delete_prefix(client, uri)
    return run


# -- incremental: frozen embeddings and first half of the blocks --------------------------
def incremental(model: GPT, bucket_uri: str, client: Any, saves: int = 3) -> dict[str, Any]:
    half = len(model.blocks) // 2
    frozen = [model.wte, model.wpe, *model.blocks[:half]]
    for module in frozen:
        module.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    repo = Repo(f"{bucket_uri}/incremental-{uuid.uuid4().hex[:6]}")
    rows = []
    cfg = model.cfg
    for i in range(saves):
        idx = torch.randint(0, cfg.vocab_size, (2, 33))
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        version = repo.commit(state_of(model, opt), step=i)
        changed = sum(
            t.nbytes
            for p in trainable
            for t in [p, *opt.state[p].values()]
            if isinstance(t, torch.Tensor)
        )
        rows.append(
            {
                "save": i + 1,
                "uploaded": version.uploaded_bytes,
                "logical": version.logical_bytes,
                "changed": changed,
            }
        )
    for module in frozen:
        module.requires_grad_(True)
    delete_prefix(client, repo.uri)
    return {"rows": rows, "frozen_modules": len(frozen)}


# -- report --------------------------------------------------------------------------------
def report(
    args: argparse.Namespace, results: list[Contender], logical: int, inc: dict[str, Any]
) -> None:
    by = {c.name: c for c in results}
    alt = [c for c in results if not c.name.startswith(("cloudckpt", "ceiling")) and c.runs]
    fastest_save = min(alt, key=lambda c: median([r.save for r in c.runs]))
    fastest_restore = min(alt, key=lambda c: median([r.restore for r in c.runs]))
    copy = median([r.save for r in by["ceiling: memory copy"].runs])
    lines = [
        "# cloudckpt against the alternatives",
        "",
        f"`python benchmarks/compare.py --preset {args.preset} --repeats {args.repeats}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f}"
        f" GiB, {platform.python_version()}, torch {torch.__version__}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}: GPT-2 {'small' if args.preset == 'gpt2' else 'mini'}"
        f" + AdamW after one step, {logical / MB:.0f} MB of tensors, to a local SeaweedFS on "
        "the same machine. Median of the repetitions (range in brackets); contenders "
        "alternated run by run.",
        "",
        "| contender | save s | restore s | blocked s (async) | stored MB | stored / raw "
        "| peak extra RSS save MB | restore MB | CPU s save: client / server "
        "| CPU s restore: client / server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results:
        if c.error:
            lines.append(f"| {c.name} | error: {c.error} | | | | | | | | |")
            continue
        blocked = [x.blocked for x in c.runs if x.blocked is not None]
        lines.append(
            f"| {c.name} | {spread(c, 'save')} | {spread(c, 'restore')} | "
            f"{f'{median(blocked):.3f}' if blocked else ''} | {med(c, 'stored') / MB:.0f} | "
            f"{med(c, 'stored') / logical:.3f} | {med(c, 'save_rss') / MB:.0f} | "
            f"{med(c, 'restore_rss') / MB:.0f} | {med(c, 'save_cpu'):.1f} / "
            f"{med(c, 'save_server_cpu'):.1f} | {med(c, 'restore_cpu'):.1f} / "
            f"{med(c, 'restore_server_cpu'):.1f} |"
        )
    cloud = by["cloudckpt"].runs
    ours_save, ours_restore = median([r.save for r in cloud]), median([r.restore for r in cloud])
    alt_save = median([r.save for r in fastest_save.runs])
    alt_restore = median([r.restore for r in fastest_restore.runs])
    blocked = median([r.blocked for r in by["cloudckpt async"].runs if r.blocked is not None])
    ratios = {
        "save": ours_save / alt_save,
        "restore": ours_restore / alt_restore,
        "blocked": blocked / copy,
        "stored": median([r.stored for r in cloud]) / logical,
        "save_rss_mb": median([r.save_rss for r in cloud]) / MB,
    }
    cores = os.cpu_count() or 1
    floor = median([r.save_server_cpu for r in cloud]) / cores
    ratios["save_floor"] = ours_save / floor
    inc_rows = inc["rows"][1:]
    inc_ratio = max(r["uploaded"] / r["changed"] for r in inc_rows)
    lines += [
        "",
        "## Against the targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| save <= 0.6x the fastest alternative ({fastest_save.name}, {alt_save:.2f} s) | "
        f"{ratios['save']:.2f}x ({ours_save:.2f} s) | {'yes' if ratios['save'] <= 0.6 else 'no'} |",
        f"| restore <= 0.5x the fastest alternative ({fastest_restore.name}, "
        f"{alt_restore:.2f} s) | {ratios['restore']:.2f}x ({ours_restore:.2f} s) | "
        f"{'yes' if ratios['restore'] <= 0.5 else 'no'} |",
        f"| save <= 1.15x the floor (the server's CPU for our bytes / {cores} cores, "
        f"{floor:.2f} s) | {ratios['save_floor']:.2f}x ({ours_save:.2f} s) | "
        f"{'yes' if ratios['save_floor'] <= 1.15 else 'no'} |",
        f"| async blocking <= 1.5x one in-memory copy ({copy:.3f} s) | {ratios['blocked']:.2f}x "
        f"({blocked:.3f} s) | {'yes' if ratios['blocked'] <= 1.5 else 'no'} |",
        f"| stored <= 0.85x raw | {ratios['stored']:.3f}x | "
        f"{'yes' if ratios['stored'] <= 0.85 else 'no'} |",
        f"| incremental upload <= 1.1x the changed tensors | {inc_ratio:.2f}x | "
        f"{'yes' if inc_ratio <= 1.1 else 'no'} |",
        f"| peak extra RSS during save <= 512 MiB | {ratios['save_rss_mb']:.0f} MB | "
        f"{'yes' if ratios['save_rss_mb'] <= 512 * 2**20 / MB else 'no'} |",
        "",
        *floor_section(by["cloudckpt"], fastest_save, fastest_restore, logical),
        "## Incremental: embeddings and the first half of the blocks frozen",
        "",
        "| save | uploaded MB | tensors that changed MB | uploaded / changed | full state MB |",
        "|---|---|---|---|---|",
    ]
    for r in inc["rows"]:
        lines.append(
            f"| {r['save']} | {r['uploaded'] / MB:.1f} | {r['changed'] / MB:.1f} | "
            f"{r['uploaded'] / r['changed']:.2f} | {r['logical'] / MB:.1f} |"
        )
    lines += [
        "",
        "The first save uploads everything; later ones only the chunks whose bytes changed "
        "(the trainable weights and their AdamW moments). Every other contender uploads the "
        "full state every time.",
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"ratios": ratios, "incremental": inc}, indent=1))
    plot(results, out)
    print("\n".join(lines))


def floor_section(
    ours: Contender, alt_save: Contender, alt_restore: Contender, logical: int
) -> list[str]:
    """What the shared CPUs allow: the S3 server's own CPU-seconds during a transfer,
    spread over every core, is a time no client can beat, however little CPU it uses."""
    cores = os.cpu_count() or 1
    lines = [
        "## What bounds save and restore on this machine",
        "",
        f"The S3 server runs on the same {cores} cores as the client. The CPU-seconds it "
        f"spends to take in (or send out) a checkpoint, divided by {cores} cores, is a wall "
        "time no client can beat here, even one that used no CPU at all.",
        "",
        "| transfer | wall s | server CPU s | server-only floor s | floor / fastest "
        "alternative | client CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for what, alt in (("save", alt_save), ("restore", alt_restore)):
        for c in (ours, alt):
            floor = med(c, f"{what}_server_cpu") / cores
            lines.append(
                f"| {c.name} {what} | {med(c, what):.2f} | {med(c, f'{what}_server_cpu'):.1f} | "
                f"{floor:.2f} | {floor / med(alt, what):.2f}x | {med(c, f'{what}_cpu'):.1f} |"
            )
    save_floor = med(ours, "save_server_cpu") / cores / med(alt_save, "save")
    stored = med(ours, "stored")
    per_gb = med(ours, "save_server_cpu") / (stored / 1e9)
    lines += [
        "",
        f"The server spends {per_gb:.1f} CPU-seconds per GB that cloudckpt uploads, so its "
        f"{stored / MB:.0f} MB take the server alone {save_floor:.2f}x the fastest "
        f"alternative's whole save. A save at 0.6x would need the server to take in "
        f"{0.6 * med(alt_save, 'save') * cores / per_gb * 1e3:.0f} MB at most, i.e. "
        f"{0.6 * med(alt_save, 'save') * cores / per_gb * 1e9 / logical:.2f}x of "
        "raw: below the byte-entropy bound of these fp32 tensors (~0.83, "
        "RESULTS-compression.md)."
        if save_floor > 0.6
        else f"The server alone needs {save_floor:.2f}x the fastest alternative's save.",
        "",
    ]
    return lines


def plot(results: list[Contender], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in results if c.runs and not c.name.startswith("ceiling")]
    names = [c.name for c in done]
    save = [median([r.save for r in c.runs]) for c in done]
    restore = [median([r.restore for r in c.runs]) for c in done]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], save, height=0.4, label="save")
    ax.barh([i - 0.2 for i in y], restore, height=0.4, label="restore")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median)")
    ax.set_title("Checkpoint save and restore to a local S3 (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


#: What the targets are computed from: always measured, whatever ``--only`` names.
REPORTED = ("cloudckpt", "cloudckpt async", "ceiling: memory copy")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["gpt2", "small"], default="gpt2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="comma-separated contender names")
    p.add_argument(
        "--out",
        help="where the report goes (default: benchmarks/ for the gpt2 "
        "preset, benchmarks/small/ for the other)",
    )
    args = p.parse_args(argv)
    args.out = args.out or str(HERE if args.preset == "gpt2" else HERE / "small")
    model, opt = build(args.preset)
    logical = logical_bytes(model, opt)
    with SeaweedFS() as server:
        os.environ.update(server.env())
        client = server.client()
        bucket = server.create_bucket()
        todo = contenders(model, opt, client, server.endpoint)
        if args.only:
            chosen = {*args.only.split(","), *REPORTED}
            todo = [c for c in todo if c.name in chosen]
            if not any(c.name not in REPORTED and not c.name.startswith("ceiling") for c in todo):
                p.error("--only needs at least one alternative to compare with")
        for rep in range(args.repeats):
            order = todo[rep % len(todo) :] + todo[: rep % len(todo)]
            for c in order:
                if c.error:
                    continue
                uri = f"s3://{bucket}/{c.name.replace(' ', '-')}-{uuid.uuid4().hex[:6]}"
                try:
                    run = measure(c, uri, client, server.pid)
                except Exception as e:  # recorded in the report, not hidden
                    c.error = f"{type(e).__name__}: {str(e)[:160]}".replace("|", "/")
                    traceback.print_exc()
                    continue
                c.runs.append(run)
                print(
                    f"rep {rep} {c.name}: save {run.save:.2f}s restore {run.restore:.2f}s "
                    f"stored {run.stored / MB:.0f} MB",
                    flush=True,
                )
        inc = incremental(model, f"s3://{bucket}", client)
    report(args, todo, logical, inc)


if __name__ == "__main__":
    main()
