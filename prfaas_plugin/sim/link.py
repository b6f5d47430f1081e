"""The cross-datacenter link as one shared pipe (fluid model): concurrent KV transfers share the
capacity max-min fairly (what competing TCP/RDMA flows converge to), the capacity follows a trace
(dips, a second tenant), and a transfer cannot run ahead of the prefill that produces it -- the
layer-wise overlap: while its prefill runs, a flow is capped at S_kv / T_prefill (each layer's KV
is sent as soon as it is computed), after it the flow drains at its fair share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import simpy


@dataclass
class _Flow:
    bits: float  # still to send
    cap_bps: float  # production rate while its prefill runs
    produced_at: float  # end of its prefill: no cap from then on
    done: simpy.Event
    rate: float = 0.0


class SharedLink:
    def __init__(self, env: simpy.Environment, gbps: float, trace: list[tuple[float, float]] | None = None) -> None:
        self.env = env
        self._trace = sorted(trace or [])
        self.capacity_bps = gbps * 1e9
        self._flows: list[_Flow] = []
        self._last = env.now
        self._kick = env.event()
        self.sent_bits = 0.0
        #: (time, bits delivered since the previous entry) for the egress series
        self.delivered: list[tuple[float, float]] = []
        env.process(self._run())

    def send(self, nbytes: float, produce_s: float) -> simpy.Event:
        """A transfer of ``nbytes`` whose prefill runs for the next ``produce_s`` seconds."""
        self._advance()
        done = self.env.event()
        bits = nbytes * 8.0
        cap = bits / produce_s if produce_s > 0 else math.inf
        self._flows.append(_Flow(bits, cap, self.env.now + produce_s, done))
        if not self._kick.triggered:
            self._kick.succeed()
        return done

    def _advance(self) -> None:
        dt = self.env.now - self._last
        self._last = self.env.now
        if dt <= 0:
            return
        moved = 0.0
        for f in self._flows:
            d = min(f.bits, f.rate * dt)
            f.bits -= d
            moved += d
        if moved:
            self.sent_bits += moved
            self.delivered.append((self.env.now, moved))

    def _allocate(self) -> None:
        """Max-min fair shares under the per-flow production caps (water-filling)."""
        now = self.env.now
        left = self.capacity_bps
        active = list(self._flows)
        for f in active:
            f.rate = 0.0
        caps = sorted(active, key=lambda f: f.cap_bps if now < f.produced_at else math.inf)
        n = len(caps)
        for i, f in enumerate(caps):
            cap = f.cap_bps if now < f.produced_at else math.inf
            share = left / (n - i)
            f.rate = min(cap, share)
            left -= f.rate

    def _run(self):
        eps = 1e-9
        while True:
            self._advance()
            now = self.env.now
            # capacity: the last trace point at or before now (the configured gbps before the first)
            for at, gbps in self._trace:
                if at <= now + eps:
                    self.capacity_bps = gbps * 1e9
            finished = [f for f in self._flows if f.bits <= 1.0]
            for f in finished:
                self._flows.remove(f)
                f.done.succeed()
            self._allocate()
            nxt = math.inf
            for f in self._flows:
                if f.rate > 0:
                    nxt = min(nxt, f.bits / f.rate)
                if f.produced_at > now + eps:
                    nxt = min(nxt, f.produced_at - now)
            for at, _g in self._trace:
                if at > now + eps:
                    nxt = min(nxt, at - now)
                    break
            if self._kick.triggered:
                self._kick = self.env.event()
            if math.isinf(nxt):
                yield self._kick
            else:
                yield self.env.any_of([self._kick, self.env.timeout(max(nxt, eps))])
