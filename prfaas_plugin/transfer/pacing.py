"""Egress pacing: a token bucket shared by every data connection of a sender, so PrfaaS
traffic can be held under a share of a shared inter-datacenter link."""

from __future__ import annotations

import threading
import time


class Pacer:
    """``consume(n)`` returns once ``n`` bytes fit the budget; the burst is 10 ms of budget
    (at least one chunk), small enough that the rate holds over any 100 ms window."""

    def __init__(self, gbps: float | None, min_burst: int = 1 << 20) -> None:
        self.rate = None if gbps is None else gbps * 1e9 / 8.0  # bytes/s
        self.burst = 0.0 if self.rate is None else max(float(min_burst), self.rate * 0.01)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int, stop: threading.Event | None = None) -> None:
        if self.rate is None:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n  # may go negative: the debt is paid by sleeping below
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
