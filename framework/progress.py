"""Progress for long stages: a live line on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time


class Progress:
    """`already`: units an earlier, interrupted run did; counted as done, not in the rate (the ETA
    of a resumed stage was the remaining work at the speed of everything done "this second")."""

    def __init__(self, what: str, total: int, unit: str = "rows", every_s: float = 10.0, logger=None,
                 already: int = 0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.log = logger or logging.getLogger("framework.progress")
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0
        self.done = self.already = already

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= (0.5 if self.tty else self.every_s) or self.done >= self.total:
            self.last = now
            self._show(now)

    def rate(self) -> float:
        return (self.done - self.already) / max(time.perf_counter() - self.start, 1e-9)

    def _show(self, now: float) -> None:
        rate = (self.done - self.already) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} "
            f"({100 * self.done / max(self.total, 1):.0f}%), {rate:,.0f} {self.unit}/s, ETA {eta:,.0f}s"
        )
        if self.tty:
            end = "\n" if self.done >= self.total else ""
            print(f"\r{line}", end=end, file=sys.stderr, flush=True)
        else:
            self.log.info(line)
