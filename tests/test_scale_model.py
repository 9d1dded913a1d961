"""benchmarks/scale_model.py plans what the library plans and counts requests that scale
as the code makes them."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cloudckpt import tree
from cloudckpt.blobs import BlobWriter, TransferOptions
from cloudckpt.blobs.writer import _plan
from cloudckpt.distributed import replicated
from cloudckpt.store import Store
from cloudckpt.testing.gpt import GPTConfig, train_state

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "scale_model", ROOT / "benchmarks" / "scale_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_model"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


sm = _load()
KiB = 1024


@pytest.mark.parametrize("chunk", [8 * KiB, 16 * KiB, 1 << 20])
def test_the_synthetic_gpt_plans_the_blobs_a_real_one_does(chunk: int) -> None:
    cfg = GPTConfig()
    _, real = tree.flatten(train_state(cfg, steps=1))
    shape = sm.Shape(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd)
    synthetic = sm.gpt_leaves(shape)
    assert [(x.path, x.dtype, x.shape) for x in synthetic] == [
        (x.path, x.dtype, x.shape) for x in real
    ]
    options = TransferOptions(chunk_size=chunk, pack_below=4 * KiB)
    planned = BlobWriter(Store("memory://scale-model"), options).plan(real)
    modelled = _plan(synthetic, options.chunk_size, options.pack_below)
    assert [(b.pieces, b.size) for b in modelled] == [(b.pieces, b.size) for b in planned]
    counted = sm.count_plan(synthetic, chunk, 4 * KiB, 32 << 20)
    assert counted == sm.summary(planned, 32 << 20)
    assert counted.blobs == len(planned) > 1


def test_gpt2_small_with_adamw_is_the_state_of_the_benchmarks() -> None:
    state = sm.state_for("gpt2-small")
    assert state.nbytes == 12 * 124_439_808 + 4 * 148  # 3 fp32 per parameter + 148 steps


@pytest.mark.parametrize("spec", ["gpt2-small", "100GB"])
@pytest.mark.parametrize("chunk", [1 << 20, 16 << 20, 96 << 20])
def test_counting_equals_planning(spec: str, chunk: int) -> None:
    state = sm.state_for(spec)
    for leaves in (list(state.leaves), *sm.shard(state, 64)):
        planned = _plan(leaves, chunk, 1 << 20)
        assert sm.count_plan(leaves, chunk, 1 << 20, 32 << 20) == sm.summary(planned, 32 << 20)


def test_a_blob_of_two_parts_is_a_multipart_upload() -> None:
    part = 32 << 20
    assert sm.puts_per_blob(16 << 20, part) == 1
    assert sm.puts_per_blob(64 << 20, part, ratio=1.0) == 2 + 2  # create, 2 parts, complete
    assert sm.puts_per_blob(64 << 20, part) == 1  # compressed below two parts


def test_shares_are_the_replicated_writers_shares() -> None:
    rng = random.Random(0)
    for world in (1, 3, 8, 64):
        sizes = [rng.choice([16, 16, 16, 5, 1, 0]) << 20 for _ in range(rng.randrange(1, 300))]
        assert sm.shares(sizes, world) == replicated.shares(sizes, world)


def test_the_hottest_prefix_is_above_the_mean_and_below_the_total() -> None:
    assert sm.PREFIXES == 256
    assert sm.hottest(1) == 1
    assert sm.hottest(0) == 0
    for count in (256, 25_600, 2_560_000):
        mean = count / 256
        assert mean < sm.hottest(count) < mean + 6 * mean**0.5 + 6
    assert sm.hottest(25_600, bins=1) == 25_600


def test_requests_scale_with_ranks_as_the_code_makes_them() -> None:
    model = sm.Model(sm.Config())
    state = sm.state_for("gpt2-small")
    saves = {n: model.save(state, "replicated", n, [60.0]) for n in (8, 16, 4096)}
    # The same blobs whatever the ranks; each rank uploads its share of them.
    assert len({r.blobs for r in saves.values()}) == 1
    assert len({r.total.put for r in saves.values()}) == 1
    assert saves[16].rank0_bytes < saves[8].rank0_bytes <= state.nbytes / 8 + (16 << 20)
    # Every rank reads the parent's manifest at the same moment.
    assert saves[4096].hot_key_gets == 4096 and saves[8].hot_key_gets == 8
    assert saves[8].total.get == 8 + 4  # + rank 0: versions.json x2, the lease x2
    # Restores: every rank HEADs and GETs every blob (each), or GETs a share (spread).
    each = {n: model.load(state, "each", n, [60.0]) for n in (8, 16)}
    spread = model.load(state, "spread", 16, [60.0])
    assert each[16].total.get - 2 * 16 == 2 * (each[8].total.get - 2 * 8)
    assert spread.total.get < each[16].total.get
    assert spread.total.head == each[16].total.head == 16 * each[16].blobs
    # Sharded: every rank writes its own blobs, and reads versions.json and the manifest.
    sharded = model.save(state, "sharded", 64, [60.0])
    assert sharded.hot_key_gets == 2 * 64
    assert sharded.total.head == sharded.blobs


def test_check_passes_under_the_limits_and_fails_over_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert sm.main(["--state-bytes", "gpt2-small", "--ranks", "8", "64", "--check"]) == 0
    # 4,096 ranks read versions.json and the parent's manifest at once: 8,192 GETs in 1 s.
    assert sm.main(["--state-bytes", "gpt2-small", "--ranks", "4096", "--check"]) == 1
    assert "versions.json" in capsys.readouterr().err
    # 1,024 ranks each reading 100 GB of blobs in 10 s: the hottest blob prefix is over.
    args = ["--state-bytes", "100GB", "--ranks", "1024", "--save-seconds", "10", "--only", "load"]
    assert sm.main([*args, "--check"]) == 1
    assert "chunk_size >= " in capsys.readouterr().err
    assert sm.main([*args, "--chunk-size", "64MiB", "--check"]) == 0  # the fix it names


def test_json_and_markdown() -> None:
    rows = sm.build(["gpt2-small"], [8], [60.0], sm.Config())
    assert {(r.kind, r.layout) for r in rows} == {
        ("save", "replicated"),
        ("save", "sharded"),
        ("load", "each"),
        ("load", "spread"),
        ("load", "sharded"),
    }
    table = sm.markdown(rows, sm.Config())
    assert table.count("\n| gpt2-small |") == 5


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert sm.main(["--state-bytes", "gpt2-small", "--ranks", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["limits"] == {"put": 3500, "get": 5500, "prefixes": 256}
    assert all(row["ok"] for row in doc["rows"])


def test_the_design_notes_hold_the_table_the_defaults_print() -> None:
    notes = (ROOT / "docs" / "design-notes.md").read_text()
    assert "python benchmarks/scale_model.py --markdown" in notes
    assert (
        sm.markdown(
            sm.build(sm.DEFAULT_STATES, sm.DEFAULT_RANKS, sm.DEFAULT_SAVE_SECONDS, sm.Config()),
            sm.Config(),
        )
        in notes
    )
