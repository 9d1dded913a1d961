"""Preemption notices -> a flag the training loop acts on at a step boundary.

Signal handlers only set the flag (no I/O in a handler but one raw write to stderr); cloud
metadata pollers run in a daemon thread. A second signal within ``repeat_window`` seconds
(2 s by default) of the first is a launcher repeating itself and is ignored; a second
signal after that is a deliberate interrupt and exits at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloudckpt.results import SaveReport

log = logging.getLogger("cloudckpt")

AWS_ENDPOINT = "http://169.254.169.254"
GCP_ENDPOINT = "http://metadata.google.internal"
AZURE_ENDPOINT = "http://169.254.169.254"


@dataclass(frozen=True)
class Notice:
    """Why and when the machine goes away (``deadline`` on the ``time.monotonic`` clock)."""

    source: str
    deadline: float
    detail: str = ""


def _deadline_from(when: str | None, default_seconds: float) -> float:
    now = time.monotonic()
    if not when:
        return now + default_seconds
    try:
        at = _dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        try:  # Azure: "Mon, 19 Sep 2016 18:29:47 GMT"
            at = _dt.datetime.strptime(when, "%a, %d %b %Y %H:%M:%S %Z").replace(
                tzinfo=_dt.timezone.utc
            )
        except ValueError:
            return now + default_seconds
    if at.tzinfo is None:
        at = at.replace(tzinfo=_dt.timezone.utc)
    return now + (at - _dt.datetime.now(_dt.timezone.utc)).total_seconds()


def _get(url: str, headers: dict[str, str], timeout: float, method: str = "GET") -> str | None:
    """The body of a 200 answer, or None for 404 and unreachable endpoints."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def aws_poller(endpoint: str = AWS_ENDPOINT, timeout: float = 1.0) -> Callable[[], Notice | None]:
    """AWS EC2 spot ``instance-action`` (IMDSv2: a session token first); 2-minute notice."""

    def poll() -> Notice | None:
        token = _get(
            f"{endpoint}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            timeout,
            "PUT",
        )
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        body = _get(f"{endpoint}/latest/meta-data/spot/instance-action", headers, timeout)
        if not body:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        if doc.get("action") not in ("terminate", "stop", "hibernate"):
            return None
        return Notice("aws", _deadline_from(doc.get("time"), 120.0), body.strip())

    return poll


def gcp_poller(endpoint: str = GCP_ENDPOINT, timeout: float = 1.0) -> Callable[[], Notice | None]:
    """GCP ``instance/preempted`` metadata value; about 30 seconds of notice."""

    def poll() -> Notice | None:
        body = _get(
            f"{endpoint}/computeMetadata/v1/instance/preempted",
            {"Metadata-Flavor": "Google"},
            timeout,
        )
        if body and body.strip().upper() == "TRUE":
            return Notice("gcp", time.monotonic() + 30.0, "preempted=TRUE")
        return None

    return poll


def azure_poller(
    endpoint: str = AZURE_ENDPOINT, timeout: float = 1.0
) -> Callable[[], Notice | None]:
    """Azure Scheduled Events with ``EventType: Preempt``; about 30 seconds of notice."""

    def poll() -> Notice | None:
        body = _get(
            f"{endpoint}/metadata/scheduledevents?api-version=2020-07-01",
            {"Metadata": "true"},
            timeout,
        )
        if not body:
            return None
        try:
            events = json.loads(body).get("Events", [])
        except (ValueError, AttributeError):
            return None
        for event in events:
            if event.get("EventType") == "Preempt":
                return Notice(
                    "azure", _deadline_from(event.get("NotBefore"), 30.0), json.dumps(event)
                )
        return None

    return poll


def _say(text: str) -> None:
    """One raw write to stderr: no lock, so safe in a signal handler."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


class PreemptionWatcher:
    """Sets ``notice`` when a preemption signal or a cloud notice arrives.

    ``signals``: SIGTERM and SIGINT by default (add ``signal.SIGUSR1`` for SLURM's
    ``--signal``). ``pollers``: callables from :func:`aws_poller`, :func:`gcp_poller`,
    :func:`azure_poller` (endpoints configurable), polled every ``interval`` seconds in
    a daemon thread. ``signal_notice_seconds`` is the time assumed left after a signal.

    The first signal only sets the flag: the training loop commits a final checkpoint at
    its next step boundary. What a later signal does depends on when it comes:

    - **within** ``repeat_window`` **seconds of the first** (2 s by default), any of the
      watched signals is taken for the same notice delivered again -- torchrun forwarding
      to the process group, a shell and a supervisor both signalling, a terminal's Ctrl-C
      (SIGINT) followed by torchrun's SIGTERM -- and is ignored, so it cannot abort the
      final save (async saves included). One line on stderr says so.
    - **after** the window, it is a deliberate second interrupt (a second Ctrl-C a few
      seconds later): the process exits at once with status ``128 + signum`` (130 for
      SIGINT, 143 for SIGTERM), without waiting for the save in flight. The last
      committed version stays the resume point.

    A notice from a poller is not a signal: the first signal after it still only sets the
    flag and opens the window. ``repeat_window=0`` makes every second signal exit at once.
    """

    def __init__(
        self,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
        pollers: Sequence[Callable[[], Notice | None]] = (),
        interval: float = 5.0,
        signal_notice_seconds: float = 30.0,
        repeat_window: float = 2.0,
    ) -> None:
        self.signals = tuple(signals)
        self.repeat_window = repeat_window
        self.repeats = 0  # signals ignored as repeats of the first
        self._first_signal: float | None = None
        self.pollers = list(pollers)
        self.interval = interval
        self.signal_notice_seconds = signal_notice_seconds
        self.notice: Notice | None = None
        self._event = threading.Event()
        self._stop = threading.Event()
        self._previous: dict[int, object] = {}
        self._thread: threading.Thread | None = None

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def remaining(self) -> float:
        """Seconds left before the notice's deadline (inf when not triggered)."""
        return self.notice.deadline - time.monotonic() if self.notice else float("inf")

    def start(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        elif self.signals:
            log.warning("PreemptionWatcher started off the main thread: signals not handled")
        if self.pollers and self._thread is None:
            self._thread = threading.Thread(
                target=self._poll_loop, name="cloudckpt-preemption", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def trigger(self, notice: Notice) -> None:
        if not self._event.is_set():
            self.notice = notice
            self._event.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._first_signal is None:
            self._first_signal = now
            self.trigger(Notice(name, now + self.signal_notice_seconds))
            return
        after = now - self._first_signal
        if after > self.repeat_window:
            os._exit(128 + signum)  # a deliberate second interrupt: leave now
        self.repeats += 1
        _say(
            f"cloudckpt: {name} {after:.2f}s after the first signal: ignored as a repeat "
            f"(within {self.repeat_window:g}s); the final checkpoint goes on. Send it again "
            f"after that to exit at once.\n"
        )

    def _poll_loop(self) -> None:
        while not self._stop.is_set() and not self._event.is_set():
            for poll in self.pollers:
                try:
                    notice = poll()
                except Exception as e:  # a broken poller must not kill the watcher
                    log.debug("preemption poller failed: %s", e)
                    continue
                if notice is not None:
                    log.warning("preemption notice from %s: %s", notice.source, notice.detail)
                    self.trigger(notice)
                    return
            self._stop.wait(self.interval)


#: Seconds assumed left when the preemption signal reached another rank of the job.
OTHER_RANK_NOTICE_SECONDS = 30.0


def final_save(
    watcher: PreemptionWatcher | None,
    last_save: SaveReport | None,
    wait: Callable[[], object],
    save: Callable[..., SaveReport | None],
) -> SaveReport:
    """The final checkpoint before the machine goes: ``wait`` for the save in flight to
    commit, then ``save(reason, meta=...)`` synchronously, the notice recorded in ``meta``.

    The notice is ``watcher``'s, or, when the signal reached another rank of the job,
    one :data:`OTHER_RANK_NOTICE_SECONDS` away. Warns when ``last_save`` took longer than
    the time left.
    """
    notice = watcher.notice if watcher is not None else None
    if notice is None:
        notice = Notice("another rank", time.monotonic() + OTHER_RANK_NOTICE_SECONDS)
    left = notice.deadline - time.monotonic()
    estimate = last_save.seconds if last_save else None
    if estimate is not None and estimate > left:
        log.warning(
            "preemption (%s): a full save took %.1fs last time but only %.1fs are left; "
            "committing the snapshot already uploading first, then trying the final save",
            notice.source,
            estimate,
            left,
        )
    t0 = time.perf_counter()
    wait()
    waited = time.perf_counter() - t0
    meta = {
        "source": notice.source,
        "seconds_left": round(left, 3),
        "waited_for_inflight_seconds": round(waited, 3),
    }
    report = save(f"preemption ({notice.source})", meta={"preemption": meta})
    assert report is not None  # a synchronous save returns its report
    log.warning(
        "preemption (%s): final checkpoint %s at step %d committed in %.2fs; stop training",
        notice.source,
        report.version.id,
        report.version.step,
        waited + report.seconds,
    )
    return report
