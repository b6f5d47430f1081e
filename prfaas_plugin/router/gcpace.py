"""Cyclic garbage collection on a clock, so the router's event loop never stops for long.

Why: CPython starts a young collection when *allocations minus deallocations* of tracked
objects pass 700. A router in steady state frees about as many objects (those of streams that
just ended, by then promoted to older generations) as it allocates (those of new streams), so
that count hardly moves; meanwhile the youngest generation keeps every object created since the
last collection, and the collection that finally comes walks all of them -- tens of thousands
of objects under load, milliseconds during which every stream the router relays stalls.

Here the young generation is collected every ``young_every_s`` (a few hundred objects, well
under a millisecond), the middle one every ``middle_every`` young collections (objects that
lived a few tens of milliseconds), and the whole heap every ``full_every_s`` (cycles among
long-lived objects: rare, but nothing else would free them while the pacer runs, see below).
CPython's young and middle triggers stay on as a safety net. Start-up objects are frozen out of
all of this (cli/router.py).

While it runs, CPython's own trigger never starts a *full* collection: each explicit middle
collection counts towards the oldest generation's trigger (10 by default), and with the start-up
heap frozen the "enough survivors" test compares against a small heap, so the automatic collector
would walk the whole heap up to once a second under load, at random moments, finding nothing. The pacer's own full
collection on its interval replaces it; the young and middle triggers stay as they were.

An idle router (no request open) makes almost no objects, so it collects only every
``idle_every_s`` instead of waking 100 times a second; the first request after a quiet spell
wakes the pacer (``wake``), which goes back to the short period at once.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: The oldest generation's trigger while a pacer runs: never reached.
_NO_AUTOMATIC_FULL = 2**30
_running = 0  # pacers running in this process (tests start several)
_saved_threshold: tuple[int, ...] = ()


@dataclass
class GcPacer:
    young_every_s: float = 0.01
    middle_every: int = 3
    full_every_s: float = 60.0
    #: Period while ``run``'s ``idle`` says nothing is being served.
    idle_every_s: float = 1.0
    #: Collections made, by generation (for /metrics and tests).
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    #: Longest single collection seen, seconds.
    longest_s: float = 0.0

    def __post_init__(self) -> None:
        if self.young_every_s <= 0:
            raise ValueError("young_every_s must be > 0")
        if self.middle_every < 1:
            raise ValueError("middle_every must be >= 1")
        if self.full_every_s <= 0:
            raise ValueError("full_every_s must be > 0")
        self.idle_every_s = max(self.idle_every_s, self.young_every_s)
        self._wake: asyncio.Event | None = None

    def collect_due(self, tick: int, now: float, last_full: float) -> int:
        """The generation due at ``tick``: 2 when the full interval has passed, 1 every
        ``middle_every`` ticks, else 0."""
        if now - last_full >= self.full_every_s:
            return 2
        return 1 if tick % self.middle_every == 0 else 0

    def collect(self, generation: int) -> None:
        t0 = time.perf_counter()
        gc.collect(generation)
        self.longest_s = max(self.longest_s, time.perf_counter() - t0)
        self.collections[generation] += 1

    def wake(self) -> None:
        """Work arrived: end an idle wait now (cheap enough to call per request)."""
        if self._wake is not None and not self._wake.is_set():
            self._wake.set()

    async def run(self, idle: Callable[[], bool] | None = None) -> None:
        """Collect until cancelled; while ``idle()`` is true, only every ``idle_every_s`` or
        when ``wake`` is called."""
        global _running, _saved_threshold
        self._wake = asyncio.Event()
        if _running == 0:
            _saved_threshold = gc.get_threshold()
            gc.set_threshold(_saved_threshold[0], _saved_threshold[1], _NO_AUTOMATIC_FULL)
        _running += 1
        try:
            await self._loop(idle)
        finally:
            _running -= 1
            if _running == 0:
                gc.set_threshold(*_saved_threshold)

    async def _loop(self, idle: Callable[[], bool] | None) -> None:
        assert self._wake is not None
        tick, last_full = 0, time.monotonic()
        while True:
            if idle is not None and idle():
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_every_s)
                    continue  # woken by work: the short period starts now (no extra collection)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(self.young_every_s)
            tick += 1
            now = time.monotonic()
            gen = self.collect_due(tick, now, last_full)
            if gen == 2:
                last_full = now
            self.collect(gen)
