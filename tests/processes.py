"""Helpers for tests that run real child processes and kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Kill and wait for ``proc`` on the way out, whatever happened."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60) -> None:
    """SIGKILL ``proc`` once ``ready()`` holds (polled), asserting it is still running."""
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the child finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def wait_forked(pid: int, timeout: float = 60) -> tuple[int, bool]:
    """Wait for a forked child, SIGKILLing it after ``timeout`` seconds; returns its
    return code (minus the signal number if killed) and whether it finished in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), False


def torchrun(ranks: int, *args: str) -> list[str]:
    """The command line of a single-machine torchrun job of ``ranks`` processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *args,
    ]


def infra_script(name: str, *args: str) -> subprocess.Popen:
    """Start ``infra/<name>`` (a local server for users) with this interpreter."""
    return subprocess.Popen(
        ["bash", str(Path(__file__).resolve().parents[1] / "infra" / name), *args],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHON": sys.executable},
    )


def exported_env(proc: subprocess.Popen, timeout: float = 60) -> dict[str, str]:
    """The ``export NAME=value`` lines an infra script prints before "# Ctrl-C"."""
    assert proc.stdout is not None
    env: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("export "):
            name, value = line.removeprefix("export ").strip().split("=", 1)
            env[name] = value.strip("'")
        if line.startswith("# Ctrl-C") or not line:
            break
    return env
