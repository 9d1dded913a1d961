"""A byte progress bar shared by a transfer's threads (off unless asked for)."""

from __future__ import annotations

import threading

from tqdm.auto import tqdm


class Progress:
    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc) if enabled else None
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
