"""Preemption: real signals to real processes, and cloud metadata endpoints played by a
local HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from http_servers import serving
from processes import reaped

from cloudckpt import CheckpointManager, HealthCheck, Repo
from cloudckpt.preemption import PreemptionWatcher, aws_poller, azure_poller, gcp_poller

TRAIN = str(Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py")


class Metadata(ThreadingHTTPServer):
    """Plays one cloud's metadata service: no notice until ``notice()`` is called."""

    daemon_threads = True

    def __init__(self, cloud: str) -> None:
        self.cloud, self.noticed, self.requests = cloud, False, []
        super().__init__(("127.0.0.1", 0), _MetadataHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _MetadataHandler(BaseHTTPRequestHandler):
    server: Metadata

    def _reply(self, status: int, body: str = "") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:  # AWS IMDSv2 token
        self.server.requests.append(("PUT", self.path, dict(self.headers)))
        if self.server.cloud == "aws" and self.path == "/latest/api/token":
            return self._reply(200, "token-123")
        return self._reply(404)

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, dict(self.headers)))
        cloud, noticed = self.server.cloud, self.server.noticed
        if cloud == "aws" and self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != "token-123" or not noticed:
                return self._reply(404)
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
            return self._reply(200, json.dumps({"action": "terminate", "time": when}))
        if cloud == "gcp" and self.path == "/computeMetadata/v1/instance/preempted":
            ok = self.headers.get("Metadata-Flavor") == "Google"
            return self._reply(200 if ok else 403, "TRUE" if noticed else "FALSE")
        if cloud == "azure" and self.path.startswith("/metadata/scheduledevents"):
            events = [{"EventId": "1", "EventType": "Preempt", "NotBefore": ""}] if noticed else []
            return self._reply(200, json.dumps({"Events": events}))
        return self._reply(404)

    def log_message(self, *args: object) -> None:
        pass


def metadata(cloud: str) -> AbstractContextManager[Metadata]:
    return serving(Metadata(cloud))


POLLERS = {"aws": aws_poller, "gcp": gcp_poller, "azure": azure_poller}


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_cloud_notice_stops_training_with_a_final_checkpoint(cloud, tmp_path) -> None:
    with metadata(cloud) as server:
        watcher = PreemptionWatcher(
            signals=(), pollers=[POLLERS[cloud](server.endpoint)], interval=0.05
        ).start()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mgr = CheckpointManager(
            f"file://{tmp_path}/repo",
            save_every_steps=1000,
            preemption=watcher,
            health=HealthCheck(spike_factor=1e9),
        )
        mgr.restore(model=model, optimizer=opt)
        step, result = 0, None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            result = mgr.step(step + 1, metrics={"loss": loss.item()})
            step = result.step
            if step == 5:
                server.noticed = True
            if result.preempted:
                break
            time.sleep(0.01)
        watcher.stop()
        assert result is not None and result.preempted and mgr.preempted
        final = Repo(f"file://{tmp_path}/repo").resolve("main")
        assert final.step == step and final.meta["reason"] == f"preemption ({cloud})"
        assert final.meta["preemption"]["source"] == cloud
        if cloud == "aws":
            assert 100 < final.meta["preemption"]["seconds_left"] <= 121


def last_step(log: Path) -> int:
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.parametrize("trial", range(3))
def test_sigterm_at_a_random_step_commits_the_last_completed_step_and_exits_0(
    seaweedfs, tmp_path, trial
) -> None:
    uri = seaweedfs.fresh_uri("spot")
    log = tmp_path / "steps.jsonl"
    env = {**os.environ, **seaweedfs.env()}
    proc = subprocess.Popen(
        [
            sys.executable,
            TRAIN,
            "--uri",
            uri,
            "--steps",
            "100000",
            "--save-every",
            "100000",
            "--log",
            str(log),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    target = random.Random(trial).randint(3, 40)
    deadline = time.monotonic() + 120
    while last_step(log) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert time.monotonic() - sent < 30  # within the default notice window
    final = Repo(uri, seaweedfs.storage_options()).resolve("main")
    assert final.step == last_step(log) >= target
    assert final.meta["reason"] == "preemption (SIGTERM)"
    assert "preempted: final checkpoint" in out


def test_a_repeat_within_the_window_is_ignored_and_a_later_interrupt_exits_at_once() -> None:
    """A cloud notice came first (not a signal); then SIGTERM only sets the flag, a repeat
    50 ms later is ignored, and a deliberate SIGINT after the 2 s window exits at once."""
    script = (
        "import time\n"
        "from cloudckpt.preemption import Notice, PreemptionWatcher\n"
        "w = PreemptionWatcher().start()\n"
        "w.trigger(Notice('aws', time.monotonic() + 120))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with reaped(proc):
        assert proc.stdout and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert proc.poll() is None  # the first signal only sets the flag
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert proc.poll() is None  # a repeat within the window is ignored
        time.sleep(PreemptionWatcher().repeat_window)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
        assert time.monotonic() - sent < 2
        assert "ignored as a repeat" in (proc.stderr.read() if proc.stderr else "")


def test_a_repeated_sigterm_does_not_abort_the_final_async_save(seaweedfs, tmp_path) -> None:
    """Launchers deliver SIGTERM more than once (torchrun forwarding to the process group, a
    shell and a supervisor both signalling): the repeat within the window is ignored."""
    uri = seaweedfs.fresh_uri("spot")
    log = tmp_path / "steps.jsonl"
    env = {**os.environ, **seaweedfs.env()}
    proc = subprocess.Popen(
        [
            sys.executable,
            TRAIN,
            "--uri",
            uri,
            "--steps",
            "100000",
            "--save-every",
            "3",
            "--async-save",
            "--log",
            str(log),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while last_step(log) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    final = Repo(uri, seaweedfs.storage_options()).resolve("main")
    assert final.step == last_step(log) and final.meta["reason"] == "preemption (SIGTERM)"
    assert "ignored" in out and "preempted: final checkpoint" in out


def test_remaining_counts_down_to_the_notices_deadline() -> None:
    from cloudckpt.preemption import Notice

    watcher = PreemptionWatcher(signals=())
    assert watcher.remaining() == float("inf")  # no notice yet
    watcher.trigger(Notice("test", time.monotonic() + 10.0))
    assert 9.0 < watcher.remaining() <= 10.0
    watcher.trigger(Notice("later", time.monotonic() + 100.0))  # the first notice stands
    assert watcher.remaining() <= 10.0 and watcher.notice and watcher.notice.source == "test"
