"""Scale model (issue 20): the store requests of one save and one restore at N ranks,
planned without data or store, checked against S3's per-prefix request limits.

    python benchmarks/scale_model.py --markdown            # the table of docs/design-notes.md
    python benchmarks/scale_model.py --state-bytes 100GB --ranks 512 --save-seconds 10
    python benchmarks/scale_model.py --check               # exit 1 if a row is over the limits
    python benchmarks/scale_model.py --json

The blobs come from the library's own planner (``cloudckpt.blobs.writer._plan``) run on
``Leaf`` records without values; the request counts follow ``commit.Transaction``,
``distributed.replicated`` and ``dcp.writer``/``dcp.reader`` call by call (see
``save_requests`` and ``load_requests``). Layouts:

- ``replicated``: DDP, the same state on every rank, ``DistributedOptions(write="spread")``:
  every rank plans the same blobs and uploads the share ``replicated.shares`` gives it.
  (The default ``write="rank0"`` makes the same requests from rank 0 alone.)
- ``sharded``: DCP, every rank writes its own shards: ``1/N`` of every tensor (FSDP's even
  split; FSDP2 gives the last ranks a little less), replicated scalars on rank 0.

A save is assumed to change every blob (training moves every weight): each blob is one
HEAD (``BlobWriter._upload``'s ``stat``) and one PUT, or a multipart upload (a POST, one
PUT per ``StoreOptions.part_size`` part, a POST) when its stored size reaches two parts.

S3 (https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html):
3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second per partitioned prefix;
a new prefix starts as one partition and is split as its load grows, gradually (503 Slow
Down meanwhile). Blob keys are ``blobs/<2 hex>/<hash>``: once split, 256 prefixes, hashed
uniformly; the hottest is the 1-in-100 worst of 256 bins (Poisson tail, union bound),
its requests spread evenly over the save. Before the split (a new bucket or repository),
every blob request lands on one partition: the ``unsplit`` columns. The small keys every
rank reads at the start of a save or load (``versions.json``, the parent's manifest) are
read by all ranks at once: their reads are counted within ``--burst-seconds``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this directory comes first on the path, and its compression.py would
# stand in for the standard library's ``compression`` that urllib3 probes (3.14+): it
# would import torch and the benchmark's dependencies.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cloudckpt.blobs.chunks import blob_key  # noqa: E402
from cloudckpt.blobs.options import MiB, TransferOptions  # noqa: E402
from cloudckpt.blobs.writer import Planned, _plan  # noqa: E402
from cloudckpt.schema import MAX_DOCUMENT  # noqa: E402
from cloudckpt.store.options import StoreOptions  # noqa: E402
from cloudckpt.tree import Leaf  # noqa: E402

#: S3's documented request rates per partitioned prefix (per second).
S3_PUT_LIMIT = 3500  # PUT, COPY, POST, DELETE
S3_GET_LIMIT = 5500  # GET, HEAD
#: Blob key prefixes: ``blobs/<hh>/`` -> 16 ** 2.
PREFIXES = 16 ** len(blob_key("0" * 32).split("/")[1])
#: Stored / raw bytes of fp32 training state (GPT + AdamW, benchmarks/RESULTS-distributed.md:
#: 191 of 229 MB); decides which blobs reach the multipart size.
STORED_RATIO = 0.834
#: The hottest prefix is the count that 256 uniform bins exceed with this probability.
RISK = 0.01
DEFAULT_STATES = ("gpt2-small", "100GB", "1TB")
DEFAULT_RANKS = tuple(2**k for k in range(3, 13))  # 8 .. 4096
DEFAULT_SAVE_SECONDS = (60.0, 10.0)
#: Chunk sizes the smallest-chunk search tries.
CANDIDATES = tuple(MiB << k for k in range(0, 13))  # 1 MiB .. 4 GiB


# -- states --------------------------------------------------------------------------------
class Record(Leaf):
    """A ``Leaf`` without a value whose sizes are computed once (the planner asks often)."""

    def __init__(self, path: str, dtype: str, shape: tuple[int, ...]) -> None:
        super().__init__(path, "torch", dtype, shape)
        self._itemsize = super().itemsize
        self._nbytes = math.prod(shape) * self._itemsize

    @property
    def itemsize(self) -> int:
        return self._itemsize

    @property
    def nbytes(self) -> int:
        return self._nbytes


@dataclass(frozen=True)
class Shape:
    """A GPT (cloudckpt.testing.gpt.GPT: tied head, biases, LayerNorms) and AdamW."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_embd: int = 768


def gpt_leaves(shape: Shape) -> list[Leaf]:
    """The leaves ``tree.flatten`` makes of ``cloudckpt.testing.gpt.train_state``: the
    model's fp32 parameters, then per parameter AdamW's ``step``, ``exp_avg`` and
    ``exp_avg_sq`` -- as records without values, in the same order."""
    v, b, d = shape.vocab_size, shape.block_size, shape.n_embd
    params: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (v, d)), ("wpe.weight", (b, d))]
    for i in range(shape.n_layer):
        for name, dims in (
            ("ln_1.weight", (d,)),
            ("ln_1.bias", (d,)),
            ("attn.weight", (3 * d, d)),
            ("attn.bias", (3 * d,)),
            ("proj.weight", (d, d)),
            ("proj.bias", (d,)),
            ("ln_2.weight", (d,)),
            ("ln_2.bias", (d,)),
            ("mlp.0.weight", (4 * d, d)),
            ("mlp.0.bias", (4 * d,)),
            ("mlp.2.weight", (d, 4 * d)),
            ("mlp.2.bias", (d,)),
        ):
            params.append((f"blocks.{i}.{name}", dims))
    params += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    leaves: list[Leaf] = [Record(f"model.{name}", "float32", dims) for name, dims in params]
    for n, (_, dims) in enumerate(params):
        leaves.append(Record(f"optimizer.state.{n}.step", "float32", ()))
        leaves.append(Record(f"optimizer.state.{n}.exp_avg", "float32", dims))
        leaves.append(Record(f"optimizer.state.{n}.exp_avg_sq", "float32", dims))
    return leaves


def shape_for(nbytes: int) -> Shape:
    """A GPT-shaped model whose fp32 + AdamW state is about ``nbytes``: width ~128 x depth
    (GPT-3's proportions), width a multiple of 128."""
    params = nbytes / 12  # weight, exp_avg, exp_avg_sq: 3 x fp32
    layers = max(1, round((params / (12 * 128**2)) ** (1 / 3)))
    base = Shape()
    linear = base.vocab_size + base.block_size
    width = (-linear + math.sqrt(linear**2 + 48 * layers * params)) / (24 * layers)
    return Shape(n_layer=layers, n_embd=max(128, round(width / 128) * 128))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"100GB"``, ``"1TB"``, ``"16MiB"``, ``"1.5e9"`` -> bytes."""
    found = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if found is None or found.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100GB, 1TB, 16MiB)")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


@dataclass(frozen=True)
class State:
    name: str
    leaves: tuple[Leaf, ...]

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)


def state_for(spec: str) -> State:
    """``gpt2-small`` (GPT-2 small + AdamW, exact) or a size (a GPT-shaped state)."""
    if spec == "gpt2-small":
        return State(spec, tuple(gpt_leaves(Shape())))
    shape = shape_for(parse_bytes(spec))
    name = f"{spec} (GPT {shape.n_layer}x{shape.n_embd})"
    return State(name, tuple(gpt_leaves(shape)))


def shard(state: State, ranks: int) -> tuple[list[Leaf], list[Leaf]]:
    """DCP's leaves on rank 0 and on any other rank: ``1/ranks`` of every tensor; the
    scalars (AdamW steps, replicated) are written once, by rank 0."""
    mine: list[Leaf] = []
    scalars: list[Leaf] = []
    for leaf in state.leaves:
        if not leaf.shape:
            scalars.append(leaf)
            continue
        rows = math.ceil(leaf.shape[0] / ranks)
        mine.append(Record(f"{leaf.path}@{rows}", leaf.dtype, (rows, *leaf.shape[1:])))
    return mine + scalars, mine


# -- plans ---------------------------------------------------------------------------------
def puts_per_blob(raw: int, part_size: int, ratio: float = STORED_RATIO) -> int:
    """PUT-class requests of one blob (``S3Backend.put``): a PUT, or a multipart upload
    (create, one per part, complete) once the stored blob is two parts or more."""
    stored = math.ceil(raw * ratio)
    return 1 if stored < 2 * part_size else 2 + math.ceil(stored / part_size)


@dataclass(frozen=True)
class PlanSummary:
    blobs: int
    nbytes: int
    puts: int

    def __add__(self, other: PlanSummary) -> PlanSummary:
        return PlanSummary(
            self.blobs + other.blobs, self.nbytes + other.nbytes, self.puts + other.puts
        )

    def times(self, k: int) -> PlanSummary:
        return PlanSummary(self.blobs * k, self.nbytes * k, self.puts * k)


def summary(planned: Iterable[Planned], part_size: int) -> PlanSummary:
    blobs = nbytes = puts = 0
    for blob in planned:
        blobs, nbytes = blobs + 1, nbytes + blob.size
        puts += puts_per_blob(blob.size, part_size)
    return PlanSummary(blobs, nbytes, puts)


@dataclass(frozen=True)
class Sizes:
    """What ``_plan`` looks at in a list of leaves, below and above the pack size: the
    small leaves in order (they fill packs in order), the large ones counted by size."""

    small: tuple[tuple[int, tuple[str, str]], ...]
    large: tuple[tuple[int, int, int], ...]  # (nbytes, itemsize, how many)

    @classmethod
    def of(cls, leaves: Iterable[Leaf], small_below: int) -> Sizes:
        small: list[tuple[int, tuple[str, str]]] = []
        large: Counter[tuple[int, int]] = Counter()
        for leaf in leaves:
            n = leaf.nbytes
            if 0 < n < small_below:
                small.append((n, (leaf.kind, leaf.dtype)))
            elif n:
                large[(n, leaf.itemsize)] += 1
        return cls(tuple(small), tuple((n, i, k) for (n, i), k in large.items()))


def count_plan(
    leaves: Sequence[Leaf] | Sizes, chunk_size: int, pack_below: int, part_size: int
) -> PlanSummary:
    """:func:`summary` of ``_plan(leaves, ...)`` by its arithmetic, without a record per
    blob (the smallest-chunk search plans a TB at 1 MiB; tests check it equals _plan).
    ``Sizes`` given must have been made with ``min(pack_below, chunk_size)``."""
    small = min(pack_below, chunk_size)
    sizes = leaves if isinstance(leaves, Sizes) else Sizes.of(leaves, small)
    blobs = nbytes = puts = 0
    packs: dict[tuple[str, str], int] = {}

    def add(size: int, count: int = 1) -> None:
        nonlocal blobs, nbytes, puts
        blobs, nbytes = blobs + count, nbytes + size * count
        puts += puts_per_blob(size, part_size) * count

    for n, key in sizes.small:
        if key not in packs or packs[key] + n > chunk_size:
            if key in packs:
                add(packs[key])
            packs[key] = 0
        packs[key] += n
    for size in packs.values():
        add(size)
    for n, itemsize, k in sizes.large:
        step = max(itemsize, chunk_size - chunk_size % itemsize)  # as _chunk_bounds
        add(step, (n // step) * k)
        if n % step:
            add(n % step, k)
    return PlanSummary(blobs, nbytes, puts)


def shares(sizes: Sequence[int], world: int) -> list[int]:
    """``cloudckpt.distributed.replicated.shares`` (largest first, to the least loaded
    rank, ties to the lowest), with a heap: the same owners in O(n log world) instead of
    O(n world) (tests check they agree; that module imports torch)."""
    owner = [0] * len(sizes)
    heap = [(0, rank) for rank in range(world)]
    negated = [-size for size in sizes]
    for i in sorted(range(len(sizes)), key=negated.__getitem__):  # stable: ties by index
        load, rank = heap[0]
        owner[i] = rank
        heapq.heapreplace(heap, (load + sizes[i], rank))
    return owner


# -- S3 ------------------------------------------------------------------------------------
def hottest(count: int, bins: int = PREFIXES, risk: float = RISK) -> int:
    """The number of ``count`` uniformly hashed keys on the fullest of ``bins`` prefixes,
    exceeded with probability at most ``risk`` (Poisson tail, union bound over bins)."""
    if count <= 0:
        return 0
    lam = count / bins
    target = risk / bins
    if lam > 500:  # normal approximation; z for a one-sided tail of ``target``
        z = math.sqrt(2) * _erfcinv(2 * target)
        return min(count, math.ceil(lam + z * math.sqrt(lam)))
    cdf, k = 0.0, 0
    while True:
        cdf += math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))
        if 1.0 - cdf <= target or k >= count:
            return min(count, max(k, 1))
        k += 1


def _erfcinv(y: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid) > y else (lo, mid)
    return (lo + hi) / 2


# -- requests ------------------------------------------------------------------------------
@dataclass
class Requests:
    """Requests by kind (S3's classes: PUT counts PUT and multipart POSTs)."""

    put: int = 0
    get: int = 0
    head: int = 0
    list: int = 0

    def __add__(self, other: Requests) -> Requests:
        return Requests(
            self.put + other.put,
            self.get + other.get,
            self.head + other.head,
            self.list + other.list,
        )

    def text(self) -> str:
        return f"{self.put}/{self.get}/{self.head}/{self.list}"


#: What one save reads and writes besides blobs, by who makes the request (per save).
SAVE_METADATA = {
    "replicated": {
        "every rank": [
            "GET manifests/<parent>.json (Transaction.begin: the parent's blobs; rank 0 in "
            "its begin, the others in _SpreadSave.upload)",
        ],
        "rank 0": [
            "GET versions.json (begin: parent, gc epoch, fence)",
            "GET leases/<branch>.json x2 (a manager's writer lease: lease.check at begin "
            "and before publishing; none without a lease)",
            "PUT manifests/<id>.json (if-absent)",
            "GET + conditional PUT versions.json (versions.update; +1 pair per lost race)",
            "PUT published/<id> (the acknowledgement marker)",
        ],
    },
    "sharded": {
        "every rank": [
            "GET versions.json and GET manifests/<parent>.json (each rank's "
            "Transaction.begin: the coordinator's in prepare_global_plan, the others' in "
            "write_data)",
        ],
        "rank 0": [
            "PUT manifests/<id>.json (if-absent)",
            "GET + conditional PUT versions.json (versions.update)",
            "PUT published/<id>",
        ],
    },
}
#: Start markers: none are stored -- the Start (parent, gc epoch, clean) travels over the
#: gloo group. LIST: none on the normal path; ``present_blobs`` lists ``blobs/`` (one
#: request per 1,000 keys) when a garbage collection ran during the save and the commit
#: holds more than 64 blobs.
SAVE_ALL_RANKS_GETS = {"replicated": 1, "sharded": 2}  # metadata GETs by every rank
SAVE_RANK0 = {"replicated": Requests(put=3, get=4), "sharded": Requests(put=3, get=1)}

LOAD_METADATA = {
    "every rank": [
        "GET versions.json (Repo.resolve / DCP read_metadata)",
        "GET manifests/<id>.json",
    ],
    "each": ["HEAD every blob (BlobReader.check_sizes)", "GET every blob"],
    "spread": [
        "HEAD every blob (check_sizes runs in every rank's Repo.load, before fetch)",
        "GET the blobs of its share of the tensors (replicated.shares by tensor bytes), "
        "then broadcast",
    ],
    "sharded": ["GET the blobs of its own shards (no HEAD: the DCP reader does not check)"],
}


@dataclass
class Window:
    """Rates during one save (or restore) of ``seconds``."""

    seconds: float
    hot_put: float  # PUT-class requests/s on the hottest blob prefix
    hot_get: float  # GET+HEAD requests/s on the hottest blob prefix
    unsplit_put: float  # ... with every blob prefix on one partition
    unsplit_get: float
    ok: bool  # the hottest blob prefix and the hot keys within S3's limits
    ok_unsplit: bool
    min_chunk: int | None  # smallest chunk size keeping the hottest prefix within limits
    min_chunk_unsplit: int | None
    fix: str = ""


@dataclass
class Row:
    kind: str  # "save" | "load"
    state: str
    state_bytes: int
    layout: str  # save: replicated | sharded; load: each | spread | sharded
    ranks: int
    chunk_size: int
    blobs: int  # distinct blobs of the version
    blob_bytes: int
    rank0_blobs: int  # rank 0's blobs (written, or read); shares gives it the largest first
    rank0_bytes: int
    rank0: Requests  # rank 0's requests, metadata included
    rank0_extra: Requests  # rank 0's requests beyond the other ranks' metadata
    total: Requests  # every rank's requests
    hot_key_gets: float  # GETs/s on the small keys all ranks read at once
    manifest_bytes: int  # the version's manifest, estimated
    windows: list[Window] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(w.ok for w in self.windows)


@dataclass(frozen=True)
class Config:
    chunk_size: int = TransferOptions().chunk_size
    pack_below: int = TransferOptions().pack_below
    part_size: int = StoreOptions().part_size
    burst_seconds: float = 1.0


@dataclass
class Planning:
    """One plan of ``_plan``, with what the rows need of it."""

    leaves: list[Leaf]
    planned: list[Planned]
    puts: list[int]  # PUT-class requests per blob
    summary: PlanSummary
    manifest: int  # bytes of its manifest entries (see _manifest_bytes)
    _blobs_of: list[set[int]] | None = None

    @classmethod
    def of(cls, leaves: list[Leaf], config: Config, dcp: bool) -> Planning:
        planned = _plan(leaves, config.chunk_size, config.pack_below)
        puts = [puts_per_blob(b.size, config.part_size) for b in planned]
        total = PlanSummary(len(planned), sum(b.size for b in planned), sum(puts))
        return cls(leaves, planned, puts, total, _manifest_bytes(leaves, planned, dcp))

    def blobs_of(self) -> list[set[int]]:
        """Leaf -> the blobs holding its bytes."""
        if self._blobs_of is None:
            self._blobs_of = [set() for _ in self.leaves]
            for n, blob in enumerate(self.planned):
                for i, _, _ in blob.pieces:
                    self._blobs_of[i].add(n)
        return self._blobs_of


class Model:
    """Plans and counts, memoized by (state, ranks, chunk size)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._counts: dict[tuple[str, int, int, str], PlanSummary] = {}
        self._plans: dict[tuple[str, int], tuple[Planning, Planning]] = {}
        self._sizes: dict[tuple[str, int, int], tuple[Sizes, Sizes]] = {}

    def plans(self, state: State, ranks: int | None) -> tuple[Planning, Planning]:
        """The plan of rank 0 and of any other rank: the whole state (``ranks`` None:
        replicated), or DCP's shards."""
        key = (state.name, ranks or 0)
        if key not in self._plans:
            if ranks is None:
                whole = Planning.of(list(state.leaves), self.config, dcp=False)
                self._plans[key] = (whole, whole)
            else:
                first, other = shard(state, ranks)
                self._plans[key] = (
                    Planning.of(first, self.config, dcp=True),
                    Planning.of(other, self.config, dcp=True),
                )
        return self._plans[key]

    # blob counts of a save, for any chunk size (the search) --------------------------------
    def totals(self, state: State, layout: str, ranks: int, chunk: int) -> PlanSummary:
        key = (state.name, ranks if layout == "sharded" else 1, chunk, layout)
        if key not in self._counts:
            c = self.config
            small = min(c.pack_below, chunk)
            if layout == "replicated":
                found = count_plan(self.sizes(state, None, small)[0], chunk, *self._opts)
            else:
                first, other = self.sizes(state, ranks, small)
                found = count_plan(first, chunk, *self._opts) + count_plan(
                    other, chunk, *self._opts
                ).times(ranks - 1)
            self._counts[key] = found
        return self._counts[key]

    @property
    def _opts(self) -> tuple[int, int]:
        return self.config.pack_below, self.config.part_size

    def sizes(self, state: State, ranks: int | None, small: int) -> tuple[Sizes, Sizes]:
        key = (state.name, ranks or 0, small)
        if key not in self._sizes:
            if ranks is None:
                whole = Sizes.of(state.leaves, small)
                self._sizes[key] = (whole, whole)
            else:
                first, other = shard(state, ranks)
                self._sizes[key] = (Sizes.of(first, small), Sizes.of(other, small))
        return self._sizes[key]

    def within(self, blobs: int, puts: int, gets: int, seconds: float, bins: int) -> bool:
        """Whether the fullest of ``bins`` prefixes stays within S3's limits."""
        top = hottest(blobs, bins)
        share = top / blobs if blobs else 0.0
        return puts * share / seconds <= S3_PUT_LIMIT and gets * share / seconds <= S3_GET_LIMIT

    def smallest_chunk(
        self,
        state: State,
        layout: str,
        ranks: int,
        seconds: float,
        bins: int,
        reads: float,
        saving: bool,
    ) -> int | None:
        """The smallest candidate chunk size whose blob requests fit ``bins`` prefixes over
        ``seconds``; ``reads``: GET+HEAD requests per blob (a save: its HEAD and its PUTs;
        a load: its reads by every rank, and no PUT)."""
        for chunk in CANDIDATES:
            t = self.totals(state, layout, ranks, chunk)
            puts = t.puts if saving else 0
            if self.within(t.blobs, puts, round(t.blobs * reads), seconds, bins):
                return chunk
        return None

    # rows -------------------------------------------------------------------------------
    def save(self, state: State, layout: str, ranks: int, times: Sequence[float]) -> Row:
        c = self.config
        meta_gets = SAVE_ALL_RANKS_GETS[layout]
        if layout == "replicated":
            whole, _ = self.plans(state, None)
            owner = shares([b.size for b in whole.planned], ranks)
            blobs, nbytes, puts = [0] * ranks, [0] * ranks, [0] * ranks
            for n, rank in enumerate(owner):
                blobs[rank] += 1
                nbytes[rank] += whole.planned[n].size
                puts[rank] += whole.puts[n]
            r0 = PlanSummary(blobs[0], nbytes[0], puts[0])  # rank 0: the largest blob
            total = whole.summary
            manifest = whole.manifest
        else:
            first, other = self.plans(state, ranks)
            r0 = first.summary
            total = first.summary + other.summary.times(ranks - 1)
            manifest = first.manifest + other.manifest * (ranks - 1)
        rank0 = SAVE_RANK0[layout]
        r0_req = Requests(put=r0.puts, get=meta_gets, head=r0.blobs) + rank0
        total_req = Requests(put=total.puts, get=meta_gets * ranks, head=total.blobs) + rank0
        row = Row(
            "save",
            state.name,
            state.nbytes,
            layout,
            ranks,
            c.chunk_size,
            total.blobs,
            total.nbytes,
            r0.blobs,
            r0.nbytes,
            r0_req,
            rank0,
            total_req,
            meta_gets * ranks / c.burst_seconds,
            manifest,
        )
        for seconds in times:
            row.windows.append(self._window(row, state, total.puts, total.blobs, 1, seconds))
        return row

    def load(self, state: State, layout: str, ranks: int, times: Sequence[float]) -> Row:
        c = self.config
        if layout == "sharded":
            first, other = self.plans(state, ranks)
            blobs = first.summary + other.summary.times(ranks - 1)
            gets, heads, r0 = blobs.blobs, 0, first.summary
            r0_req = Requests(get=2 + r0.blobs)
            manifest = first.manifest + other.manifest * (ranks - 1)
        else:
            whole, _ = self.plans(state, None)
            blobs = whole.summary
            heads = blobs.blobs * ranks
            manifest = whole.manifest
            if layout == "each":
                gets, r0 = blobs.blobs * ranks, blobs
            else:  # spread: tensors shared out by bytes, each rank GETs its tensors' blobs
                blobs_of = whole.blobs_of()
                owner = shares([leaf.nbytes for leaf in whole.leaves], ranks)
                fetched: list[set[int]] = [set() for _ in range(ranks)]
                for i, rank in enumerate(owner):
                    fetched[rank] |= blobs_of[i]
                gets = sum(len(m) for m in fetched)
                r0 = PlanSummary(len(fetched[0]), sum(whole.planned[n].size for n in fetched[0]), 0)
            r0_req = Requests(get=2 + r0.blobs, head=blobs.blobs)
        total_req = Requests(get=2 * ranks + gets, head=heads)
        row = Row(
            "load",
            state.name,
            state.nbytes,
            layout,
            ranks,
            c.chunk_size,
            blobs.blobs,
            blobs.nbytes,
            r0.blobs,
            r0.nbytes,
            r0_req,
            Requests(),
            total_req,
            2 * ranks / c.burst_seconds,
            manifest,
        )
        reads = (gets + heads) / blobs.blobs if blobs.blobs else 0
        for seconds in times:
            row.windows.append(self._window(row, state, 0, blobs.blobs, reads, seconds))
        return row

    def _window(
        self, row: Row, state: State, puts: int, blobs: int, reads: float, seconds: float
    ) -> Window:
        """Rates of ``row`` over ``seconds``: ``reads`` GET-class requests per blob."""
        gets = blobs * reads
        share = hottest(blobs) / blobs if blobs else 0.0
        w = Window(
            seconds,
            hot_put=puts * share / seconds,
            hot_get=gets * share / seconds,
            unsplit_put=puts / seconds,
            unsplit_get=gets / seconds,
            ok=False,
            ok_unsplit=False,
            min_chunk=None,
            min_chunk_unsplit=None,
        )
        hot_key_ok = row.hot_key_gets <= S3_GET_LIMIT
        prefix_ok = w.hot_put <= S3_PUT_LIMIT and w.hot_get <= S3_GET_LIMIT
        w.ok = prefix_ok and hot_key_ok
        w.ok_unsplit = w.unsplit_put <= S3_PUT_LIMIT and w.unsplit_get <= S3_GET_LIMIT
        layout = "sharded" if row.layout == "sharded" else "replicated"
        for bins in (PREFIXES, 1):
            found = self.smallest_chunk(
                state, layout, row.ranks, seconds, bins, reads, row.kind == "save"
            )
            if bins == 1:
                w.min_chunk_unsplit = found
            else:
                w.min_chunk = found
        w.fix = self._fix(row, w, hot_key_ok, prefix_ok)
        return w

    def _fix(self, row: Row, w: Window, hot_key_ok: bool, prefix_ok: bool) -> str:
        """What would bring the row within the limits over ``w``."""
        fixes = []
        if not prefix_ok:
            if w.min_chunk is not None:
                fixes.append(f"chunk_size >= {_size(w.min_chunk)}")
            else:
                need = max(w.hot_put / S3_PUT_LIMIT, w.hot_get / S3_GET_LIMIT)
                fixes.append(f"no chunk size does: >= {w.seconds * need:.0f} s or more prefixes")
            if row.layout == "each":
                fixes.append("or read='spread' with check_sizes HEADing only the rank's share")
            elif row.layout == "spread":
                fixes.append("or check_sizes HEADing only the rank's share")
        if not hot_key_ok:
            keys = (
                "the manifest" if row.layout == "replicated" else "versions.json and the manifest"
            )
            stagger = row.hot_key_gets * self.config.burst_seconds / S3_GET_LIMIT
            fixes.append(
                f"rank 0 reads {keys} once and broadcasts (or spread over {stagger:.1f} s)"
            )
        return f"{w.seconds:g} s: " + ", ".join(fixes) if fixes else ""


def _manifest_bytes(leaves: list[Leaf], planned: list[Planned], dcp: bool) -> int:
    """The JSON of the manifest entries ``assemble`` makes of ``planned`` (one entry per
    leaf, a chunk reference per piece of a blob), plus per entry its place in the
    skeleton and, for a DCP save, its item row and chunk metadata (short rows). Within
    2% of ``Manifest.encode`` of ``assemble``'s entries with fake digests for GPT-2 small
    and 100 GB (checked by hand); DCP's layout rows are estimated."""
    empty = {"path": "", "kind": "torch", "dtype": "float32", "shape": [], "chunks": []}
    digest = json.dumps("0" * 32)
    per_entry = len(json.dumps(empty)) + 2
    paths = 1
    if dcp:
        per_entry += len('{"fqn": "", "offset": [0, 0], "entry": 0}, [[0, 0], [0, 0]], ')
        paths = 2
    total = sum(per_entry + paths * len(leaf.path) + len(str(list(leaf.shape))) for leaf in leaves)
    total += sum(len(json.dumps({"tensor": i})) + len(leaf.path) for i, leaf in enumerate(leaves))
    for blob in planned:
        stored = len(str(math.ceil(blob.size * STORED_RATIO)))
        offset = 0
        for _, a, b in blob.pieces:  # [digest, size, stored, offset, blob size], plus ", "
            total += len(digest) + len(str(b - a)) + stored + len(str(offset)) + 12
            total += len(str(blob.size))
            offset += b - a
    return total


# -- output --------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def _chunk(n: int | None) -> str:
    if n is None:
        return "none"
    return f"≤{_size(n)}" if n == CANDIDATES[0] else _size(n)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _mark(ok: bool) -> str:
    return "ok" if ok else "**over**"


def markdown(rows: list[Row], config: Config) -> str:
    out: list[str] = []
    saves = [r for r in rows if r.kind == "save"]
    loads = [r for r in rows if r.kind == "load"]
    times = [w.seconds for w in (rows[0].windows if rows else [])]
    head_t = " | ".join(f"{t:g} s: hot prefix PUT/s, HEAD/s; unsplit PUT/s" for t in times)
    if saves:
        out.append(
            "| state | layout | ranks | blobs | rank 0: blobs, bytes, PUT/GET/HEAD/LIST "
            f"| metadata GET/s ({config.burst_seconds:g} s burst) | manifest | {head_t} "
            "| within limits | smallest chunk (256 prefixes / unsplit) |"
        )
        out.append("|" + "---|" * (8 + len(times)))
        for r in saves:
            cells = [
                f"{_rate(w.hot_put)}, {_rate(w.hot_get)}; {_rate(w.unsplit_put)}" for w in r.windows
            ]
            out.append(_row(r, cells))
    if loads:
        head_l = " | ".join(f"{t:g} s: hot prefix GET+HEAD/s; unsplit" for t in times)
        out += [
            "",
            "| state | read | ranks | blobs | rank 0: blobs, bytes, PUT/GET/HEAD/LIST "
            f"| metadata GET/s ({config.burst_seconds:g} s burst) | manifest | {head_l} "
            "| within limits | smallest chunk (256 prefixes / unsplit) |",
            "|" + "---|" * (8 + len(times)),
        ]
        for r in loads:
            cells = [f"{_rate(w.hot_get)}; {_rate(w.unsplit_get)}" for w in r.windows]
            out.append(_row(r, cells))
    return "\n".join(out)


def _row(r: Row, cells: list[str]) -> str:
    verdict = " / ".join(f"{w.seconds:g} s: {_mark(w.ok)}" for w in r.windows)
    fixes = [w.fix for w in r.windows if w.fix]
    if fixes:
        verdict += " (" + "; ".join(fixes) + ")"
    chunks = " / ".join(f"{_chunk(w.min_chunk)}, {_chunk(w.min_chunk_unsplit)}" for w in r.windows)
    manifest = _gb(r.manifest_bytes) + (" **>256 MiB**" if r.manifest_bytes > MAX_DOCUMENT else "")
    return (
        f"| {r.state} | {r.layout} | {r.ranks} | {r.blobs:,} | {r.rank0_blobs:,}, "
        f"{_gb(r.rank0_bytes)}, {r.rank0.text()} | {_rate(r.hot_key_gets)} | {manifest} | "
        + " | ".join(cells)
        + f" | {verdict} | {chunks} |"
    )


def build(
    states: Sequence[str],
    ranks: Sequence[int],
    times: Sequence[float],
    config: Config,
    kinds: Sequence[str] = ("save", "load"),
) -> list[Row]:
    model = Model(config)
    rows: list[Row] = []
    for spec in states:
        state = state_for(spec)
        if "save" in kinds:
            for layout in ("replicated", "sharded"):
                rows += [model.save(state, layout, n, times) for n in ranks]
        if "load" in kinds:
            for layout in ("each", "spread", "sharded"):
                rows += [model.load(state, layout, n, times) for n in ranks]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--state-bytes",
        nargs="+",
        default=list(DEFAULT_STATES),
        help="gpt2-small or sizes (100GB, 1TB, 1.5e9)",
    )
    p.add_argument("--ranks", nargs="+", type=int, default=list(DEFAULT_RANKS))
    p.add_argument(
        "--save-seconds",
        nargs="+",
        type=float,
        default=list(DEFAULT_SAVE_SECONDS),
        help="how long a save (and a restore) takes",
    )
    p.add_argument(
        "--chunk-size",
        type=parse_bytes,
        default=TransferOptions().chunk_size,
        help="TransferOptions.chunk_size (default %(default)s)",
    )
    p.add_argument(
        "--pack-below",
        type=parse_bytes,
        default=TransferOptions().pack_below,
        help="TransferOptions.pack_below (default %(default)s)",
    )
    p.add_argument(
        "--part-size",
        type=parse_bytes,
        default=StoreOptions().part_size,
        help="StoreOptions.part_size: multipart from two parts",
    )
    p.add_argument(
        "--burst-seconds",
        type=float,
        default=1.0,
        help="window in which every rank reads the small shared keys",
    )
    p.add_argument("--only", choices=("save", "load"), help="only saves or only loads")
    p.add_argument("--markdown", action="store_true", help="print the tables")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 if any row is over the limits")
    args = p.parse_args(argv)
    config = Config(
        chunk_size=args.chunk_size,
        pack_below=args.pack_below,
        part_size=args.part_size,
        burst_seconds=args.burst_seconds,
    )
    kinds = (args.only,) if args.only else ("save", "load")
    rows = build(args.state_bytes, args.ranks, args.save_seconds, config, kinds)
    if args.json:
        doc = {
            "limits": {"put": S3_PUT_LIMIT, "get": S3_GET_LIMIT, "prefixes": PREFIXES},
            "config": asdict(config),
            "save_metadata": SAVE_METADATA,
            "load_metadata": LOAD_METADATA,
            "rows": [{**asdict(r), "ok": r.ok} for r in rows],
        }
        print(json.dumps(doc, indent=1))
    elif args.markdown or not args.check:
        print(markdown(rows, config))
    over = [r for r in rows if not r.ok]
    if args.check:
        for r in over:
            fixes = "; ".join(w.fix for w in r.windows if w.fix)
            print(f"over: {r.kind} {r.state} {r.layout} x{r.ranks}: {fixes}", file=sys.stderr)
        return 1 if over else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
