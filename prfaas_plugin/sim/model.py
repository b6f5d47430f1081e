"""One deployment in SimPy. Every decision is the router's own code on the simulated clock:
``policy.decide`` (routing by uncached length, cache-aware placement), ``policy.prfaas_overloaded``
and ``policy.bandwidth_mode``, ``threshold.ThresholdController`` (both loops) and
``rebalance.plan_switch`` (the long-term P/D split), over ``instances.Fleet`` and
``prefix_index.PrefixIndex``. The simulator supplies only what the engines and the network do:
FCFS prefill per instance with the planner profile's T_prefill, the KV transfer (sim/link.py for
the cross-datacenter link, an RDMA hop locally) and continuous-batching decode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import simpy

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.planner.config import PlannerConfig
from prfaas_plugin.planner.profile import Profile
from prfaas_plugin.router import policy, rebalance
from prfaas_plugin.router.config import ThresholdSpec
from prfaas_plugin.router.instances import Fleet, Instance
from prfaas_plugin.router.threshold import ThresholdController
from prfaas_plugin.sim.config import SimulationSpec
from prfaas_plugin.sim.link import SharedLink
from prfaas_plugin.sim.workload import SimRequest

MIB = 1 << 20
TICK_S = 0.5  # the router's threshold loop period (router/app.py _threshold_loop)
SPLIT_POLL_S = 1.0  # the router's split loop period (router/app.py _split_loop)


@dataclass(frozen=True)
class Deployment:
    name: str
    n_prfaas: int
    n_prefill: int  # local prefill instances
    n_decode: int
    #: "fixed": t pinned at ``threshold``; "online": the router's ThresholdController in auto mode
    #: starting at ``threshold``; "all": every prefill remote (naive heterogeneous).
    control: Literal["fixed", "online", "all", "none"]
    threshold: float
    n_both: int = 0  # local instances that prefill and decode (the demo's single local engine)


@dataclass
class DeploymentResult:
    name: str
    deployment: Deployment
    measured_s: float
    arrivals: int
    completed: int
    unfinished: int
    throughput_rps: float
    egress_gbps: float
    offload_share: float
    #: of the measured requests' prompt tokens, the share the router found cached (l_prefix)
    cached_share: float
    ttft: np.ndarray
    ttft_arrival: np.ndarray  # arrival time of each entry of ``ttft``
    ttft_by_route: dict[str, np.ndarray]
    series: dict[str, list[float]]
    threshold_timeline: list[tuple[float, float, str]]
    switches: list[dict] = field(default_factory=list)
    #: per request, in the order of the requests simulated: 1 = offloaded to PrfaaS, 0 = local
    route: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))

    def summary(self) -> dict:
        def stats(x: np.ndarray) -> dict:
            if len(x) == 0:
                return {"n": 0}
            return {
                "n": int(len(x)),
                "mean_s": float(np.mean(x)),
                "p50_s": float(np.percentile(x, 50)),
                "p90_s": float(np.percentile(x, 90)),
                "p99_s": float(np.percentile(x, 99)),
            }

        return {
            "deployment": self.deployment.__dict__,
            "measured_s": self.measured_s,
            "arrivals": self.arrivals,
            "completed": self.completed,
            "unfinished": self.unfinished,
            "throughput_rps": self.throughput_rps,
            "egress_gbps": self.egress_gbps,
            "offload_share": self.offload_share,
            "cached_share": self.cached_share,
            "ttft": stats(self.ttft),
            "ttft_by_route": {k: stats(v) for k, v in self.ttft_by_route.items()},
            "switches": self.switches,
        }


class _Sim:
    def __init__(
        self,
        dep: Deployment,
        cfg: PlannerConfig,
        sim: SimulationSpec,
        requests: list[SimRequest],
        progress=None,
    ) -> None:
        self.dep, self.cfg, self.sim, self.requests = dep, cfg, sim, requests
        self.progress = progress
        self.env = simpy.Environment()
        d = cfg.deployment
        self.prfaas_profile: Profile = cfg.profile(d.prfaas_profile)
        self.local_profile: Profile = cfg.profile(d.pd_profile)
        self.t_decode = cfg.decode.t_decode_s
        self.out_tokens = cfg.workload.output_tokens
        self.slots = max(1, int(cfg.decode.bs_max))
        insts = [Instance(f"prfaas-{i}", "prfaas", "prfaas", "prefill") for i in range(dep.n_prfaas)]
        insts += [Instance(f"local-p{i}", "local", "local", "prefill") for i in range(dep.n_prefill)]
        insts += [Instance(f"local-d{i}", "local", "local", "decode") for i in range(dep.n_decode)]
        insts += [Instance(f"local-b{i}", "local", "local", "both") for i in range(dep.n_both)]
        self.fleet = Fleet(insts)
        self.index = PrefixIndex(sim.block_tokens)
        self.prefill_q = {i.url: simpy.Resource(self.env, 1) for i in insts}
        self.decode_q = {i.url: simpy.Resource(self.env, self.slots) for i in insts}
        self.link = SharedLink(self.env, cfg.link.gbps, [(p.at_s, p.gbps) for p in sim.link_trace])
        c = sim.controller
        spec = ThresholdSpec(
            mode="auto" if dep.control == "online" else "fixed",
            tokens=max(dep.threshold, 0.0) if sim.start_threshold is None else sim.start_threshold,
            planner="<simulation config>",
            window=c.window,
            min_samples=c.min_samples,
            reoptimize_every_s=c.reoptimize_every_s,
            egress_high=c.egress_high,
            egress_low=c.egress_low,
            queue_high=sim.queue_high,
            queue_low=c.queue_low,
            step=c.step,
            egress_window_s=c.egress_window_s,
            split_cooldown_s=c.split_cooldown_s,
        )
        rc = sim.router_clock
        #: the controller's clock at simulated time 0 (every time handed to it is on its clock)
        self.clock0 = rc.at_start_s if rc is not None else 0.0
        self.ctl = ThresholdController(
            spec,
            cfg.link.gbps,
            clock=lambda: self.env.now + self.clock0,
            planner_config=cfg if dep.control == "online" else None,
        )
        # the first tick: in phase with the router's own ticks when its clock is given
        self.first_tick = (rc.tick_at_s - rc.at_start_s) % TICK_S if rc is not None else 0.0
        if rc is not None and rc.reoptimised_at_s is not None:
            # the controller re-optimises at the first tick ``reoptimize_every_s`` after the last
            # time it did: put that last time on the router's grid (ThresholdController keeps it
            # in ``_last_opt``; no public setter, as only a replay needs another phase)
            every = spec.reoptimize_every_s
            k = np.floor((rc.at_start_s - rc.reoptimised_at_s) / every)
            # (less a microsecond: the tick on the grid point re-optimises despite rounding)
            self.ctl._last_opt = rc.reoptimised_at_s + k * every - 1e-6
        self.path = sim.measured_path
        self.spread_rng = np.random.default_rng(sim.seed + 1)  # draws from the measured spreads
        self.open_requests = 0  # arrived and not yet done (measured-path requests)
        self.open_offloaded = 0  # of those, the ones routed to PrfaaS
        self.switches: list[dict] = []
        # per request: arrival, route (1 = prfaas), first token time, done time
        n = len(requests)
        self.route = np.zeros(n, dtype=np.int8)
        self.cached = np.zeros(n)
        self.first = np.full(n, np.nan)
        self.done = np.full(n, np.nan)
        nb = int(np.ceil(sim.duration_s / sim.bin_s))
        self.series = {k: [0.0] * nb for k in ("threshold", "prfaas_queue", "local_queue", "decode_queue")}
        self.routed = np.zeros((nb, 2))
        if sim.arrivals.kind == "trace":
            for r in requests:
                if r.warm_prefix:
                    for inst in insts:
                        self.index.record(inst.url, _Prefix(r.prompt, r.warm_prefix))

    # -- the router's decision, on the simulated clock -----------------------------------------------
    def _threshold(self) -> float:
        return -1.0 if self.dep.control == "all" else self.ctl.t

    def _route(self, req: SimRequest):
        now = self.env.now
        overloaded = self.dep.control != "all" and policy.prfaas_overloaded(
            self.fleet.of_kind("prfaas"), self.sim.queue_high
        )
        mode = policy.bandwidth_mode(
            self.sim.bandwidth_mode, self.ctl.utilisation(now + self.clock0), self.ctl.spec.egress_low
        )
        d = policy.decide(req.prompt, self.fleet, self.index, self._threshold(), mode, exclude_prfaas=overloaded)
        self.ctl.observe_length(d.l_uncached)
        return d

    # -- processes ---------------------------------------------------------------------------------
    def _arrivals(self):
        for req in self.requests:
            if req.arrival > self.env.now:
                yield self.env.timeout(req.arrival - self.env.now)
            self.env.process(self._request(req))

    def _request(self, req: SimRequest):
        env = self.env
        d = self._route(req)
        remote = d.route == "prfaas"
        b = min(int(env.now / self.sim.bin_s), len(self.routed) - 1)
        self.routed[b, int(remote)] += 1
        self.route[req.rid] = int(remote)
        self.cached[req.rid] = d.l_prefix
        prefill = d.prefill or d.decode
        prefill.inflight += 1
        if d.prefill is not None:
            d.decode.inflight += 1
        if self.path is not None and (remote or prefill.role == "both"):
            self.open_requests += 1
            self.open_offloaded += remote
            yield from self._measured_path(req, d, prefill, remote)
            self.open_requests -= 1
            self.open_offloaded -= remote
            return
        profile = self.prfaas_profile if remote else self.local_profile
        with self.prefill_q[prefill.url].request() as turn:
            yield turn
            t_p = profile.prefill_s(d.l_uncached)
            kv_bytes = max(0.0, profile.kv_mib(d.l_uncached)) * MIB
            if remote:
                sent = self.link.send(kv_bytes, t_p)
                yield env.timeout(t_p)
            else:
                yield env.timeout(t_p)
        self.index.record(prefill.url, req.prompt)
        if remote:
            yield sent
            self.ctl.record_egress(int(kv_bytes), env.now + self.clock0)
            if self.sim.link_rtt_ms:
                # the prefill request crossed the link one way, the KV's completion the other
                yield env.timeout(self.sim.link_rtt_ms / 1000)
        elif d.prefill is not None:
            hop = kv_bytes * 8 / (self.sim.local_hop_gbps * 1e9) - t_p  # layer-wise: overlapped
            if hop > 0:
                yield env.timeout(hop)
        if d.prefill is not None:
            prefill.inflight -= 1
            self.index.record(d.decode.url, req.prompt)
        with self.decode_q[d.decode.url].request() as slot:
            yield slot
            if d.decode.role == "both":
                yield from self._decode_behind_prefill(req, d.decode.url, self.t_decode)
            else:
                self.first[req.rid] = env.now + self.t_decode
                yield env.timeout(self.t_decode * self.out_tokens)
        d.decode.inflight -= 1
        self.done[req.rid] = env.now

    def _decode_behind_prefill(self, req: SimRequest, url: str, step_s: float):
        """A "both" engine's decode: the first step waits for the prefill the engine is running
        (its FCFS prefill queue), then the request's first token, then the other steps."""
        with self.prefill_q[url].request() as turn:
            yield turn
            yield self.env.timeout(step_s)
        self.first[req.rid] = self.env.now
        yield self.env.timeout(step_s * (self.out_tokens - 1))

    def _measured_path(self, req: SimRequest, d, prefill: Instance, remote: bool):
        """A request served with the measured whole-path times (``SimulationSpec.measured_path``).
        An engine runs many requests at once (continuous batching), so only the prefill's compute,
        the profile's T_prefill, holds an instance exclusively (queueing there, FCFS); the rest of
        a measured time (HTTP, the router, scheduling, the transfer's handshake and bytes, the hop
        back) is a delay that overlaps with other requests. An offloaded request's first decode
        step holds its decode instance (behind a local prefill in progress there)."""
        env, path, n = self.env, self.path, d.l_uncached
        assert path is not None
        # another request open at this one's arrival: draw from the spread timed under load,
        # another of the same route: from the spread timed with two of that route at once
        busy = self.open_requests > 1
        offloaded = self.open_offloaded
        paired = offloaded > 1 if remote else self.open_requests - offloaded > 1
        if remote:
            spread = (paired and path.prfaas_spread_pair) or (busy and path.prfaas_spread_busy) or path.prfaas_spread
            rp, rt = spread[self.spread_rng.integers(len(spread))] if spread else (1.0, 1.0)
            producer = path.at("prfaas_producer_s", n) * rp
            compute = min(self.prfaas_profile.prefill_s(n), producer)
            after = max(0.0, path.at("prfaas_ttft_s", n) * rt - producer - path.decode_step_s)
            kv_bytes = max(0.0, self.prfaas_profile.kv_mib(n)) * MIB
            with self.prefill_q[prefill.url].request() as turn:
                yield turn
                sent = self.link.send(kv_bytes, compute)
                yield env.timeout(compute)
            yield env.timeout(producer - compute)
            # the producer answered: the router records the prompt for both instances then
            prefill.inflight -= 1
            self.index.record(prefill.url, req.prompt)
            self.index.record(d.decode.url, req.prompt)
            produced = env.now
            yield sent
            self.ctl.record_egress(int(kv_bytes), env.now + self.clock0)
            rest = produced + after - env.now
            if rest > 0:
                yield env.timeout(rest)
            with self.decode_q[d.decode.url].request() as slot:
                yield slot
                yield from self._decode_behind_prefill(req, d.decode.url, path.decode_step_s)
        else:
            # the router records a local prompt as the instance's once its answer opens (flow.py
            # run), i.e. at dispatch: a streamed answer's status line comes before the prefill
            self.index.record(prefill.url, req.prompt)
            ratios = (paired and path.local_spread_pair) or (busy and path.local_spread_busy) or path.local_spread
            ratio = ratios[self.spread_rng.integers(len(ratios))] if ratios else 1.0
            total = path.at("local_ttft_s", n) * ratio
            compute = min(self.local_profile.prefill_s(n), total)
            yield env.timeout(total - compute)
            with self.decode_q[d.decode.url].request() as slot:
                yield slot
                with self.prefill_q[prefill.url].request() as turn:
                    yield turn
                    yield env.timeout(compute)
                self.first[req.rid] = env.now
                yield env.timeout(path.decode_step_s * (self.out_tokens - 1))
        d.decode.inflight -= 1
        self.done[req.rid] = env.now

    def _ticker(self):
        bin_s = self.sim.bin_s
        nb = len(self.series["threshold"])
        if self.first_tick > 0:
            yield self.env.timeout(self.first_tick)
        while True:
            t = self.ctl.tick(self.fleet.queue_depth("prfaas"), self.env.now + self.clock0)
            b = min(int(self.env.now / bin_s), nb - 1)
            self.series["threshold"][b] = -1.0 if self.dep.control == "all" else t
            self.series["prfaas_queue"][b] = self.fleet.queue_depth("prfaas")
            self.series["local_queue"][b] = sum(len(self.prefill_q[i.url].queue) for i in self.fleet.of_kind("local"))
            self.series["decode_queue"][b] = sum(len(self.decode_q[i.url].queue) for i in self.fleet.of_kind("local"))
            yield self.env.timeout(TICK_S)

    def _splitter(self):
        """The long-term loop: the router's plan_switch, drain, switch (router/rebalance.py)."""
        last = -float("inf")
        while True:
            yield self.env.timeout(SPLIT_POLL_S)
            advice = self.ctl.advice
            if advice is None or self.env.now - last < self.ctl.spec.split_cooldown_s:
                continue
            plan = rebalance.plan_switch(advice, self.fleet)
            if plan is None:
                continue
            last = self.env.now
            inst = plan.instance
            inst.draining = True
            while inst.inflight > 0:
                yield self.env.timeout(SPLIT_POLL_S)
            old, inst.role, inst.draining = inst.role, plan.new_role, False
            self.index.clear_instance(inst.url)
            self.switches.append({"t": self.env.now, "url": inst.url, "from": old, "to": plan.new_role})

    def run(self) -> DeploymentResult:
        env, sim = self.env, self.sim
        env.process(self._arrivals())
        env.process(self._ticker())
        if self.dep.control == "online" and sim.controller.apply_split:
            env.process(self._splitter())
        step = max(sim.duration_s / 100, 1.0)
        t = 0.0
        while t < sim.duration_s:
            t = min(t + step, sim.duration_s)
            env.run(until=t)
            if self.progress is not None:
                self.progress(step)
        return self._result()

    def _result(self) -> DeploymentResult:
        sim = self.sim
        arr = np.array([r.arrival for r in self.requests])
        win = sim.duration_s - sim.warmup_s
        measured = arr >= sim.warmup_s
        done_in = (self.done >= sim.warmup_s) & (self.done <= sim.duration_s)
        ttft_ok = measured & ~np.isnan(self.first)
        ttft = self.first[ttft_ok] - arr[ttft_ok]
        routes = self.route[ttft_ok]
        sent = sum(bits for t, bits in self.link.delivered if t >= sim.warmup_s)
        nb = len(self.series["threshold"])
        egress = [0.0] * nb
        for t, bits in self.link.delivered:
            egress[min(int(t / sim.bin_s), nb - 1)] += bits / sim.bin_s / 1e9
        cap = []
        for b in range(nb):
            g = self.cfg.link.gbps
            for p in sim.link_trace:
                if p.at_s <= b * sim.bin_s:
                    g = p.gbps
            cap.append(g)
        tot = self.routed.sum(axis=1)
        share = np.divide(self.routed[:, 1], tot, out=np.full(nb, np.nan), where=tot > 0)
        series = dict(self.series)
        series.update(egress_gbps=egress, link_gbps=cap, offload_share=[float(x) for x in share])
        n_meas = int(measured.sum())
        return DeploymentResult(
            name=self.dep.name,
            deployment=self.dep,
            measured_s=win,
            arrivals=n_meas,
            completed=int(done_in.sum()),
            unfinished=int((measured & np.isnan(self.first)).sum()),
            throughput_rps=float(done_in.sum() / win),
            egress_gbps=sent / win / 1e9,
            offload_share=float(self.route[measured].mean()) if n_meas else 0.0,
            cached_share=float(
                self.cached[measured].sum()
                / max(1, sum(len(r.prompt) for r, m in zip(self.requests, measured, strict=True) if m))
            ),
            ttft=ttft,
            ttft_arrival=arr[ttft_ok],
            ttft_by_route={"prfaas": ttft[routes == 1], "local": ttft[routes == 0]},
            series=series,
            threshold_timeline=list(self.ctl.timeline),
            switches=self.switches,
            route=self.route.copy(),
        )


class _Prefix(Sequence):
    """The first ``n`` tokens of a prompt, for warming the index with a trace's cached prefix."""

    def __init__(self, prompt, n: int) -> None:
        self.prompt, self.n = prompt, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        a, b, _ = item.indices(self.n)
        return self.prompt[a:b]


def simulate_deployment(
    dep: Deployment, cfg: PlannerConfig, sim: SimulationSpec, requests: list[SimRequest], progress=None
) -> DeploymentResult:
    return _Sim(dep, cfg, sim, requests, progress).run()
