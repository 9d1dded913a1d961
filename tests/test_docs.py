"""`make docs`: the API reference builds from the docstrings, offline, with no warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strict_without_warnings(tmp_path: Path) -> None:
    mkdocs = str(Path(sys.executable).with_name("mkdocs"))
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr
    assert (tmp_path / "api" / "repo" / "index.html").exists()
    assert "CheckpointManager" in (tmp_path / "api" / "manager" / "index.html").read_text()
