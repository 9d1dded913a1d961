"""A byte progress bar shared by a transfer's threads (off unless asked for)."""

from __future__ import annotations

import shutil
import sys
import threading
from typing import Any

#: Seconds a transfer runs before its bar shows: quick ones draw nothing.
DELAY = 1.0
#: The widest bar drawn, and the width used where the terminal reports none.
WIDTH, FALLBACK_WIDTH = 100, 80


class Progress:
    """A bar of ``total`` bytes on stderr, when ``enabled``; cleared when closed, so
    that only the command's result stays on the screen."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # imported here: most commands never draw a bar

            # A terminal that reports 0 columns (some ptys) gets a blank bar otherwise.
            columns = shutil.get_terminal_size((0, 0)).columns or FALLBACK_WIDTH
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=desc,
                file=sys.stderr,
                ncols=min(columns, WIDTH),
                delay=DELAY,
                leave=False,
            )
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
