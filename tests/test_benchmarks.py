"""The benchmark harness runs end to end on its small preset and writes its report.

Only that the harness works is asserted here; the numbers are measured, not tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args``; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_compare_writes_a_report_with_every_contender_and_the_floor(tmp_path: Path) -> None:
    bench(
        "compare.py",
        "--preset",
        "small",
        "--repeats",
        "1",
        "--only",
        "torch.save + boto3",
        "--out",
        str(tmp_path),
        timeout=300,
    )
    report = (tmp_path / "RESULTS.md").read_text()
    for row in (
        "| cloudckpt |",
        "| cloudckpt async |",
        "| torch.save + boto3 |",
        "| ceiling: memory copy |",
    ):
        assert row in report
    assert "error:" not in report
    assert "## What bounds save and restore on this machine" in report
    assert "| cloudckpt save |" in report and "| torch.save + boto3 restore |" in report
    ratios = json.loads((tmp_path / "results.json").read_text())["ratios"]
    assert 0 < ratios["stored"] < 1  # compressed below raw
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_tiers_writes_a_report_against_every_target(tmp_path: Path) -> None:
    bench(
        "tiers.py",
        "--preset",
        "small",
        "--repeats",
        "1",
        "--local",
        str(tmp_path),
        "--out",
        str(tmp_path),
        timeout=300,
    )
    report = (tmp_path / "RESULTS-tiers.md").read_text()
    for row in (
        "| torch.save + boto3: bucket restore |",
        "| cloudckpt: bucket save |",
        "| one copy into reused buffers |",
        "| local tier: sync save |",
        "| local tier: async save, blocked |",
        "| local tier: restore after a restart |",
        "| local tier: bucket save uploaded from the tier |",
        "| blob cache: restore after a restart |",
    ):
        assert row in report, row
    assert report.count("| yes |") + report.count("| no |") == 4  # the four targets


def test_scale_model_prints_its_table_and_checks_a_small_configuration() -> None:
    proc = bench(
        "scale_model.py",
        "--state-bytes",
        "gpt2-small",
        "--ranks",
        "8",
        "64",
        "--markdown",
        "--check",
        timeout=120,
    )
    assert proc.stdout.count("\n| gpt2-small |") == 2 * 5  # 2 rank counts x 5 layouts


def test_replicas_benchmark_prints_the_peer_and_bucket_restore_table(tmp_path: Path) -> None:
    out = tmp_path / "replicas.md"
    proc = bench(
        "replicas.py",
        "--preset",
        "tiny",
        "--hosts",
        "2",
        "--repeats",
        "1",
        "--out",
        str(out),
        timeout=300,
    )
    report = out.read_text()
    assert "| hosts | bucket load | recover | peer total | peer / bucket |" in report
    assert "\n| 2 | " in report and report in proc.stdout


def test_hot_paths_times_each_path_and_counts_the_work(tmp_path: Path) -> None:
    out = bench(
        "hot_paths.py", "--preset", "tiny", "--repeats", "1", "--chunks", "64", "--dir",
        str(tmp_path),
    ).stdout  # fmt: skip
    assert "| tier upload | hashes / blob | 1.000 |" in out, "each blob hashed once"
    assert "| in-place load | opens / blob | 1.000 |" in out
    assert "| save + cache | cache holds every blob | True |" in out
