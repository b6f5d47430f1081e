"""The calibration's concurrent phases (demo/calibrate.py): which requests run at once, what each
sample records. The engines' HTTP answers are faked (``_stream``); the phase logic is real."""

from __future__ import annotations

import threading
import time

import pytest

from prfaas_plugin.demo import calibrate


class _Engines:
    """Stands in for ``calibrate._stream``: answers after ``delay_s`` and records each call's
    request id, prompt and (start, end) time."""

    def __init__(self, delay_s: float = 0.02, fail_on: str | None = None) -> None:
        self.delay_s, self.fail_on = delay_s, fail_on
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, float, float]] = []

    def __call__(self, c, url, model, prompt, out_tokens, rid):
        t0 = time.monotonic()
        if self.fail_on and self.fail_on in rid:
            raise RuntimeError(f"engine refused {rid}")
        time.sleep(self.delay_s)
        with self.lock:
            self.calls.append((rid, prompt, t0, time.monotonic()))
        return 0.05, 0.1

    def of(self, prefix: str) -> list[tuple[str, str, float, float]]:
        return [c for c in self.calls if c[0].startswith(prefix)]


def _overlaps(a: tuple, others: list[tuple]) -> bool:
    return any(b[2] < a[3] and a[2] < b[3] for b in others)


def _run(monkeypatch, engines: _Engines, name: str, loops: list[str], reps: int = 2) -> dict:
    monkeypatch.setattr(calibrate, "_stream", engines)
    into: dict = {r: {} for r in calibrate.ROUTES}
    urls = {r: f"http://fake/{r}" for r in calibrate.ROUTES}
    calibrate._concurrent_phase(urls, "m", [64, 256], reps, 12, lambda s: len(s.split()), name, loops, into)
    return into


def test_pair_phase_times_two_offloaded_requests_at_once(monkeypatch):
    engines = _Engines()
    into = _run(monkeypatch, engines, "pair", ["prfaas", "prfaas"])
    assert into["local"] == {}
    timed, other = engines.of("cal-pair0-prfaas-"), engines.of("cal-pair1-prfaas-")
    assert len(timed) == 2 * 2  # reps passes over the two lengths
    # the other client kept a second offloaded request open through the timed client's passes
    assert all(_overlaps(c, other) for c in timed[1:])
    # every prompt is fresh (no cached prefix between clients or passes) and every sample is kept
    assert len({c[1] for c in engines.calls}) == len(engines.calls)
    assert {s["rid"] for v in into["prfaas"].values() for s in v} == {c[0] for c in engines.calls}


def test_local_pair_phase_times_two_local_requests_at_once(monkeypatch):
    engines = _Engines()
    into = _run(monkeypatch, engines, "pair", ["local", "local"])
    timed, other = engines.of("cal-pair0-local-"), engines.of("cal-pair1-local-")
    assert into["prfaas"] == {} and len(timed) == 4
    assert all(_overlaps(c, other) for c in timed[1:])
    # the clients start half-way round the lengths from each other: unlike sizes meet
    assert [c[0].split("-")[3] for c in timed[:2]] == ["64", "256"]
    assert [c[0].split("-")[3] for c in other[:2]] == ["256", "64"]


def test_busy_phase_keeps_the_local_route_busy_until_prfaas_is_done(monkeypatch):
    engines = _Engines()
    into = _run(monkeypatch, engines, "busy", ["prfaas", "local"], reps=3)
    timed, local = engines.of("cal-busy0-prfaas-"), engines.of("cal-busy1-local-")
    assert sum(len(v) for v in into["prfaas"].values()) == len(timed) == 3 * 2
    assert {s["rid"] for v in into["local"].values() for s in v} == {c[0] for c in local}
    assert all(_overlaps(c, local) for c in timed[1:])
    # the local client stops once the timed one is done (at most the request it had open)
    assert max(c[2] for c in local) < max(c[3] for c in timed)


def test_a_failing_client_ends_the_phase_with_its_error(monkeypatch):
    engines = _Engines(fail_on="cal-pair1-")
    with pytest.raises(RuntimeError, match="engine refused cal-pair1-"):
        _run(monkeypatch, engines, "pair", ["prfaas", "prfaas"])
