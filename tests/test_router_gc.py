"""The router's clock-driven garbage collection (router/gcpace.py): under steady churn, where
objects die as fast as new ones are made, CPython's own trigger hardly fires and the young
generation grows without bound; the pacer keeps it small."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc

import pytest

from prfaas_plugin.router.config import GcSpec
from prfaas_plugin.router.gcpace import GcPacer


async def _churn(seconds: float) -> int:
    """Steady state: each new object replaces one made long ago (a stream that ended). Returns
    the largest young generation seen."""
    live: collections.deque[list] = collections.deque([i] for i in range(50_000))  # lists: always tracked
    gc.collect()  # the window is old now; from here on allocations and frees balance
    largest = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        for i in range(200):
            live.append([i])
            live.popleft()
        largest = max(largest, len(gc.get_objects(generation=0)))
        await asyncio.sleep(0.001)  # ~200 objects a millisecond, like a busy router
    return largest


def _young_peak(pacer: GcPacer | None, seconds: float = 0.6) -> int:
    async def main() -> int:
        task = asyncio.create_task(pacer.run()) if pacer is not None else None
        try:
            return await _churn(seconds)
        finally:
            if task is not None:
                task.cancel()

    return asyncio.run(main())


def test_young_generation_stays_small_with_the_pacer() -> None:
    unpaced = _young_peak(None)
    pacer = GcPacer(young_every_s=0.005, middle_every=3, full_every_s=60)
    paced = _young_peak(pacer)
    # Without pacing the balanced churn never trips CPython's count, so the young generation
    # keeps every object made (up to the 50,000 alive here); with it, a few milliseconds' worth (~1,000).
    assert unpaced > 40_000, unpaced
    assert paced < 6_000, paced
    assert pacer.collections[0] > 10 and pacer.collections[1] > 3
    assert pacer.collections[2] == 0  # the full interval did not pass


def test_schedule() -> None:
    p = GcPacer(young_every_s=0.01, middle_every=3, full_every_s=5)
    assert [p.collect_due(t, now=1.0, last_full=0.0) for t in range(1, 7)] == [0, 0, 1, 0, 0, 1]
    assert p.collect_due(1, now=5.0, last_full=0.0) == 2
    with pytest.raises(ValueError):
        GcPacer(young_every_s=0)
    with pytest.raises(ValueError):
        GcPacer(middle_every=0)


def test_full_collection_runs_on_its_interval() -> None:
    pacer = GcPacer(young_every_s=0.005, middle_every=3, full_every_s=0.05)

    async def main() -> None:
        task = asyncio.create_task(pacer.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10  # a full collection of a big test process's heap takes a while
        while pacer.collections[2] < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert pacer.collections[2] >= 2
    assert pacer.longest_s > 0


def test_config_validation() -> None:
    assert GcSpec().young_every_ms == 10
    with pytest.raises(ValueError):
        GcSpec(young_every_ms=-1)
    with pytest.raises(ValueError):
        GcSpec(middle_every=0)
    with pytest.raises(ValueError):
        GcSpec(idle_every_s=0)
    with pytest.raises(ValueError):
        GcSpec(bogus=1)


def test_an_idle_router_collects_rarely_and_a_request_wakes_the_pacer() -> None:
    pacer = GcPacer(young_every_s=0.01, middle_every=3, full_every_s=60, idle_every_s=1.0)
    serving = [0]

    async def main() -> tuple[int, int, int]:
        task = asyncio.create_task(pacer.run(lambda: serving[0] == 0))
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.3)
        idle_count = sum(pacer.collections)  # busy pacing would have made ~30 by now
        serving[0] = 1
        pacer.wake()  # what the router does when a request arrives after a quiet spell
        t0 = loop.time()
        while sum(pacer.collections) == idle_count and loop.time() - t0 < 5:
            await asyncio.sleep(0.001)
        woke_after_ms = int((loop.time() - t0) * 1000)
        before = sum(pacer.collections)
        await asyncio.sleep(0.3)
        busy_count = sum(pacer.collections) - before
        task.cancel()
        return idle_count, woke_after_ms, busy_count

    idle_count, woke_after_ms, busy_count = asyncio.run(main())
    assert idle_count == 0, idle_count
    assert woke_after_ms < 200, woke_after_ms  # not the 1 s idle period
    assert busy_count >= 10, busy_count  # back to every 10 ms (loose: a loaded CI host runs late)


def test_cpython_starts_no_full_collection_while_the_pacer_runs() -> None:
    """Explicit middle collections count towards CPython's full-collection trigger, so with a
    pacer running the automatic collector would walk the whole heap at random moments whenever
    enough objects outlived the middle generation (each a stall of the router's loop). The pacer
    turns that trigger off while it runs and restores it after."""
    pacer = GcPacer(young_every_s=0.005, middle_every=2, full_every_s=3600)  # no full collection of its own
    full: list[int] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    async def main() -> None:
        task = asyncio.create_task(pacer.run())
        kept: list[list[int]] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.8
        while loop.time() < end:
            # Objects that stay (requests' state outliving the middle generation), made in bursts
            # that trip CPython's young trigger between the pacer's ticks.
            kept.extend([i] for i in range(1500))
            await asyncio.sleep(0.001)
        assert gc.get_threshold()[2] > 10**6  # while running
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    before = gc.get_threshold()
    gc.callbacks.append(watch)
    try:
        asyncio.run(main())
    finally:
        gc.callbacks.remove(watch)
    assert pacer.collections[1] > 10  # the middle collections that count towards the trigger did run
    assert full == [], f"{len(full)} automatic full collections while the pacer ran"
    assert gc.get_threshold() == before
