"""The fuzzer of stored objects (benchmarks/fuzz.py), a short run: 2,000 inputs, each one
stored object of a small real repository mutated (versions.json, a manifest, a blob, the
lease, a published marker, the Lightning pointer), then load, restore, verify, log,
export and the HF and Lightning resumes run on it. Every outcome must be the pristine
result or a clear refusal (CorruptCheckpoint; CheckpointNotFound where the mutated object
names what was asked for), and nothing may be written outside the repository or the
output directory the user chose. ``make bench-fuzz`` runs 100,000 inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parent.parent
INPUTS = 2000
SEED = 7


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """On tmpfs where there is one (the store fsyncs every write; a disk is several times
    slower), else under tmp_path."""
    if os.path.isdir("/dev/shm"):
        path = Path(tempfile.mkdtemp(prefix="cloudckpt-fuzz-test-", dir="/dev/shm"))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path / "work"


def test_hostile_stored_objects_end_in_a_clear_error_and_nothing_escapes(
    tmp_path: Path, workdir: Path
) -> None:
    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "fuzz.py"),
        "--inputs",
        str(INPUTS),
        "--seed",
        str(SEED),
        "--workdir",
        str(workdir),
        "--json",
        str(summary),
        "--report",
        str(tmp_path / "RESULTS-fuzz.md"),
        "--dump",
        str(tmp_path / "other.json"),
        "--quiet",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert summary.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    s = json.loads(summary.read_text())
    assert s["inputs"] == INPUTS and s["crashes"] == 0, s
    # Not vacuous: every operation ran, and each both loaded correctly and refused.
    for op in ("log", "load", "verify", "export", "restore", "lightning", "hf"):
        counts = s["ops"].get(op, {})
        assert counts.get("ok", 0) > 0 and counts.get("corrupt", 0) > 0, (op, counts)
    groups = "\n".join(
        f"  {g['op']}: {g['why']} at {g['where']} x{g['count']} -- replay {g['replay']}: "
        f"{g['object']} {g['mutation']}: {g['detail'][:120]}"
        for g in s["groups"]
    )
    replay = f"replay one with: python benchmarks/fuzz.py --replay {SEED}:N"
    problem = f"{s['other']} outcomes were neither correct nor a clear error ({replay})"
    assert s["other"] == 0, f"{problem}:\n{groups}"
    outside = "\n".join(
        f"  {w['op']} wrote {', '.join(w['paths'][:3])} -- replay {w['replay']}: "
        f"{w['mutation'][:120]}"
        for w in s["outside"]
    )
    assert not s["outside"], f"writes outside the target ({replay}):\n{outside}"
