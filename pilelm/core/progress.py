"""Progress of long work: a tqdm bar on a terminal, plain log lines at a fixed interval elsewhere.

A bar redrawn with carriage returns turns a log file or a CI console into one enormous line,
and tqdm switched off (``disable=None`` off a terminal) leaves a long job silent. So when
stderr is not a terminal, ``Progress`` logs ``desc: done/total (pct), rate/s, eta`` every
``interval_s`` seconds (and once at the end), which reads well in a file.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("pilelm.progress")

LINE_INTERVAL_S = 10.0
"""Seconds between two progress lines when the output is not a terminal."""


class Progress:
    """``with Progress(total, "predict", "texts") as p: ... p.update(n)``."""

    def __init__(self, total: int, desc: str, unit: str = "it", interval_s: float = LINE_INTERVAL_S,
                 terminal: bool | None = None):
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar: Any = None
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if rate > 0 and self.total > self.done else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done and time.monotonic() - self.start >= self.interval_s:
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
