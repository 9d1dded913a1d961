"""Every example runs in a test: the demo here, briefly; the others where their behaviour
is checked (train_gpt.py: test_manager_resume, test_preemption; ddp_train.py:
test_distributed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_the_demo_runs_briefly_and_reports() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "spot_resume.py"),
            "--steps",
            "40",
            "--save-every",
            "10",
            "--kill-at",
            "25",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    stopped = re.search(r"stopped at step (\d+); resumed from step (\d+)", out.stdout)
    assert stopped and int(stopped[1]) == int(stopped[2]), out.stdout[-2000:]  # none redone
    assert "trained to step 40" in out.stdout
    assert "nothing was pickled" in out.stdout
    # No noise: botocore's INFO line per session, a gc warning about the demo's grace.
    said = out.stdout + out.stderr
    assert "Found credentials" not in said and "grace" not in said.lower(), said[-3000:]


def test_make_demo_runs_the_demo_script() -> None:
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert recipe and recipe[1].endswith("examples/spot_resume.py")


def test_every_example_is_run_by_a_test() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert EXAMPLES
    for example in EXAMPLES:
        assert f'"{example.name}"' in tests, f"no test runs examples/{example.name}"
