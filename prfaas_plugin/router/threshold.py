"""Keeping t right as traffic and bandwidth change (paper section 3.4.3, dual timescale).

- Re-optimisation: every ``reoptimize_every_s`` the planner searches t and the P/D split for the
  *observed* distribution of uncached lengths (an empirical sample of the last ``window``
  requests) using the planner config's profiles, counts and link. That is the long-term loop's
  advice (the split) and the short-term loop's anchor (t*).
- Short term: PrfaaS egress utilisation (KV bytes the producers' transfer engines confirmed, read
  from their /metrics, else the bytes their answers report: router/egress.py; over a sliding
  window, against the link) and the PrfaaS queue depth push t up by ``step`` when either crosses its high
  mark -- fewer, longer requests cross the link -- and let it relax back toward t* only when both
  are under their low marks. The gap between the marks is the hysteresis that stops flapping.

The router ticks every 0.5 s (router/loops.py) and runs a due re-optimisation on a worker thread
first; the simulator (prfaas_plugin.sim) calls ``tick`` on its clock and lets it re-optimise
inline. A /metrics scrape only reads the state.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prfaas_plugin.router.config import ThresholdSpec

log = logging.getLogger("prfaas.router")


@dataclass
class SplitAdvice:
    current_threshold: float
    optimal_threshold: float
    n_prefill: int
    n_decode: int
    lambda_max: float
    samples: int
    bottleneck: str  # "prefill" | "decode" | "balanced"


@dataclass
class ThresholdController:
    spec: ThresholdSpec
    link_gbps: float
    t: float = field(init=False)
    t_star: float = field(init=False)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    advice: SplitAdvice | None = None
    #: The time source: the router's monotonic clock, or a simulator's (prfaas_plugin.sim).
    clock: Callable[[], float] = time.monotonic
    #: ``auto``: the planner config already loaded (the simulator's), instead of ``spec.planner``.
    planner_config: Any = None

    def __post_init__(self) -> None:
        self.egress_window_s = self.spec.egress_window_s
        self.t = self.t_star = float(self.spec.tokens)
        self._lengths: collections.deque[int] = collections.deque(maxlen=self.spec.window)
        #: Other router replicas' recent lengths by peer (router/peers.py): (their window, read at).
        self.peer_lengths: dict[str, tuple[list[int], float]] = {}
        self._egress: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()  # the observed lengths and egress samples
        self._state = threading.Lock()  # t, t_star, advice, timeline: a re-optimisation runs on a worker thread
        self._last_opt = 0.0
        self._planner = None
        self._t0 = self.clock()
        if self.spec.mode == "auto":
            from prfaas_plugin.planner import load_config

            self._planner = self.planner_config or load_config(self.spec.planner or "")[0]
        self._kv_profile = None
        if self.spec.kv_bytes_per_token is None and self._planner is not None:
            self._kv_profile = self._planner.profile(self._planner.deployment.prfaas_profile)
        self._mark("start")

    # -- inputs -------------------------------------------------------------------------------
    def observe_length(self, uncached_tokens: int) -> None:
        with self._lock:
            self._lengths.append(int(uncached_tokens))

    def recent_lengths(self) -> list[int]:
        """This replica's own window of observed lengths (what its peers read)."""
        with self._lock:
            return list(self._lengths)

    def record_egress(self, nbytes: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            self._egress.append((now, int(nbytes)))

    def predicted_kv_bytes(self, uncached_tokens: int) -> int:
        """What ``uncached_tokens`` of prefill should put on the link, for producers that do not
        say (0 when neither ``kv_bytes_per_token`` nor a planner profile is configured)."""
        if uncached_tokens <= 0:
            return 0
        if self.spec.kv_bytes_per_token is not None:
            return int(self.spec.kv_bytes_per_token * uncached_tokens)
        if self._kv_profile is not None:
            return int(max(0.0, self._kv_profile.kv_mib(uncached_tokens)) * (1 << 20))
        return 0

    def egress_gbps(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        with self._lock:
            while self._egress and self._egress[0][0] < now - self.egress_window_s:
                self._egress.popleft()
            total = sum(b for _, b in self._egress)
        return total * 8 / self.egress_window_s / 1e9

    def utilisation(self, now: float | None = None) -> float:
        return self.egress_gbps(now) / self.link_gbps

    # -- the loops ------------------------------------------------------------------------------
    def tick(self, prfaas_queue: int, now: float | None = None) -> float:
        """One step of both loops; returns the threshold to use. A re-optimisation that is due
        runs here, inline (the simulator's way); the router runs it first, off its event loop
        (``reoptimise``), so that this step finds it done."""
        now = self.clock() if now is None else now
        if self.spec.mode == "fixed":
            return self.t
        if self.reoptimise_due(now):
            self.reoptimise(now)
        util = self.utilisation(now)
        s = self.spec
        with self._state:
            if util > s.egress_high or prfaas_queue > s.queue_high:
                new = min(s.max_tokens, max(self.t * (1 + s.step), self.t + 1))
                if new != self.t:
                    self.t = new
                    self._mark(f"raise: egress {util:.0%} of link, PrfaaS queue {prfaas_queue}")
            elif util < s.egress_low and prfaas_queue <= s.queue_low and self.t != self.t_star:
                if self.t > self.t_star:
                    self.t = max(self.t_star, self.t * (1 - s.step))
                else:
                    self.t = min(self.t_star, self.t * (1 + s.step))
                self._mark(f"relax toward planner t* = {self.t_star:.0f}")
            return self.t

    def reoptimise_due(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return self.spec.mode == "auto" and now - self._last_opt >= self.spec.reoptimize_every_s

    def reoptimise(self, now: float | None = None) -> None:
        """The long-term loop's step: a planner search on the observed lengths. It is a full grid
        search (tens of ms at the case study's scale, more with a longer window), so the router
        calls it from a worker thread: on the event loop it would hold every request in flight
        for that long. Only the result is applied under the state lock."""
        from prfaas_plugin.planner import Empirical, plan

        self._last_opt = self.clock() if now is None else now
        with self._lock:
            samples = list(self._lengths)
            for peer in self.peer_lengths.values():
                samples += peer[0]
        if self._planner is None or len(samples) < self.spec.min_samples:
            return
        try:
            result = plan(self._planner.system(), Empirical.from_samples(samples), self._planner.search.threshold_step)
        except ValueError as exc:
            log.warning("threshold re-optimisation failed: %s", exc)
            return
        b = result.best
        produce = b.theta_prfaas + b.theta_pd_p
        bottleneck = "balanced"
        if produce < 0.9 * b.theta_pd_d:
            bottleneck = "prefill"
        elif produce > 1.1 * b.theta_pd_d:
            bottleneck = "decode"
        with self._state:
            old = self.t_star
            self.t_star = b.threshold
            if self.t == old:  # not currently pushed up by congestion: follow the optimum at once
                self.t = self.t_star
            self.advice = SplitAdvice(self.t, b.threshold, b.n_p, b.n_d, b.lambda_max, len(samples), bottleneck)
            if abs(old - self.t_star) > 1e-9:
                self._mark(f"re-optimised on {len(samples)} observed lengths")

    def _mark(self, reason: str) -> None:
        self.timeline.append((round(self.clock() - self._t0, 3), self.t, reason))
        if len(self.timeline) > 10_000:
            del self.timeline[: len(self.timeline) - 10_000]
        log.info("threshold t=%.0f (%s)", self.t, reason)

    def snapshot(self) -> dict[str, Any]:
        return {
            "mode": self.spec.mode,
            "threshold_tokens": self.t,
            "planner_threshold_tokens": self.t_star,
            "egress_gbps": self.egress_gbps(),
            "link_gbps": self.link_gbps,
            "samples": len(self._lengths),
            "timeline": self.timeline[-200:],
            "split_advice": None if self.advice is None else self.advice.__dict__,
        }

    def set_fixed(self, tokens: float) -> None:
        """Admin override: pin t (mode becomes fixed until restart)."""
        self.spec = self.spec.model_copy(update={"mode": "fixed", "tokens": tokens})
        self.t = self.t_star = float(tokens)
        self._mark("set by admin")
