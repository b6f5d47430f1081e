"""The router's background work: instance health, the producers' egress counters, the
short-term threshold loop's tick and the long-term loop's P/D split."""

from __future__ import annotations

import asyncio
import logging
import time

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.egress import SENT_BYTES, EgressMeter, sent_bytes_total
from prfaas_plugin.router.engine_load import read_load
from prfaas_plugin.router.gcpace import GcPacer
from prfaas_plugin.router.instances import Fleet, Instance
from prfaas_plugin.router.metrics import RouterMetrics
from prfaas_plugin.router.peers import new_replica_id, peers_loop
from prfaas_plugin.router.rebalance import SplitApplier
from prfaas_plugin.router.threshold import ThresholdController
from prfaas_plugin.router.upstream import Upstream, UpstreamError

log = logging.getLogger("prfaas.router")


class ControlLoops:
    def __init__(
        self,
        cfg: RouterConfig,
        fleet: Fleet,
        index: PrefixIndex,
        controller: ThresholdController,
        egress: EgressMeter,
        metrics: RouterMetrics,
        gc_pacer: GcPacer | None,
    ) -> None:
        self.cfg, self.fleet, self.index, self.controller, self.egress = cfg, fleet, index, controller, egress
        self.metrics, self.gc_pacer = metrics, gc_pacer
        self.splitter: SplitApplier | None = None
        self.replica_id = new_replica_id()  # among the router replicas (peers.py)

    def start(self, client: Upstream, peer_client: Upstream, spawn: list[asyncio.Task[None]]) -> None:
        """Start every loop the config asks for; their tasks are appended to ``spawn``. ``client``
        talks to the engines, ``peer_client`` to the other router replicas."""
        spawn.append(asyncio.create_task(self._health_loop(client)))
        spawn.append(asyncio.create_task(self._threshold_loop()))
        if self.cfg.threshold.egress_scrape_s > 0:
            spawn.append(asyncio.create_task(self._egress_loop(client)))
        if self.cfg.replicas.load_scrape_s > 0:
            spawn.append(asyncio.create_task(self._load_loop(client)))
        if self.cfg.threshold.mode == "auto" and (self.cfg.replicas.peers or self.cfg.replicas.peers_dns):
            spawn.append(
                asyncio.create_task(peers_loop(peer_client, self.cfg.replicas, self.controller, self.replica_id))
            )
        if self.cfg.threshold.apply_split:
            th, t = self.cfg.threshold, self.cfg.timeouts
            self.splitter = SplitApplier(client, self.index, th.split_cooldown_s, th.drain_timeout_s, t.prefill_s)
            spawn.append(asyncio.create_task(self._split_loop()))

    async def _health_loop(self, client: Upstream) -> None:
        """Probes at once (a router started beside its engines must not trust them for a whole
        interval), then each instance on its own clock: ``health_every_s`` while up,
        ``health_down_every_s`` while down."""
        t = self.cfg.timeouts
        down_every = min(t.health_every_s, t.health_down_every_s)
        while True:
            due = self.fleet.due_for_probe(time.monotonic(), t.health_every_s, down_every)
            if due:
                await self.fleet.check_health(client, t.health_timeout_s, t.health_failures, only=due)
            for inst in self.fleet.instances:
                self.metrics.healthy.labels(inst.cluster, inst.url).set(1 if inst.healthy else 0)
            await asyncio.sleep(down_every)

    async def _split_loop(self) -> None:
        assert self.splitter is not None
        while True:
            await asyncio.sleep(1.0)
            advice = self.controller.advice
            if advice is None:
                continue
            try:
                outcome = await self.splitter.apply(advice, self.fleet)
            except Exception:
                log.exception("applying the P/D split failed")
                continue
            if outcome is not None:
                self.metrics.role_switches.labels(outcome).inc()

    async def _egress_loop(self, client: Upstream) -> None:
        """Read the producers' sent-bytes counters (router/egress.py says why)."""
        every = self.cfg.threshold.egress_scrape_s
        while True:
            await asyncio.gather(*(self._read_egress(client, i, every) for i in self.fleet.of_kind("prfaas")))
            await asyncio.sleep(every)

    async def _read_egress(self, client: Upstream, inst: Instance, timeout_s: float) -> None:
        try:
            status, text = await client.get_text(f"{inst.url}/metrics", max(timeout_s, 1.0))
        except UpstreamError:
            return  # down or slow: its counter is read again next time (increments are not lost)
        value = sent_bytes_total(text) if status == 200 else None
        if value is None:
            if self.egress.measured(inst.url):
                log.warning(
                    "instance %s no longer exposes %s; using the bytes its answers report",
                    inst.url,
                    " or ".join(SENT_BYTES),
                )
            self.egress.forget(inst.url)
            return
        delta = self.egress.update(inst.url, value)
        if delta > 0:
            self.controller.record_egress(delta)

    async def _load_loop(self, client: Upstream) -> None:
        """Read every instance's own queue gauges (router/engine_load.py says why)."""
        every = self.cfg.replicas.load_scrape_s
        while True:
            await self.read_loads(client, max(every, 1.0))
            await asyncio.sleep(every)

    async def read_loads(self, client: Upstream, timeout_s: float) -> None:
        await asyncio.gather(*(read_load(client, i, timeout_s) for i in self.fleet.instances))
        for inst in self.fleet.instances:
            self.metrics.instance_load.labels(inst.cluster, inst.url).set(inst.load)

    async def _threshold_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.threshold_step()
            except Exception:  # a broken step must not freeze t for the router's lifetime
                log.exception("threshold loop step failed")

    async def threshold_step(self) -> None:
        """A re-optimisation when due, then one tick."""
        if self.controller.reoptimise_due():
            # the planner search, off the event loop: requests in flight keep moving
            await asyncio.to_thread(self.controller.reoptimise)
        self.tick()

    def tick(self) -> None:
        """One step of the short-term loop, and the gauges that show it."""
        self.controller.tick(self.fleet.queue_depth("prfaas"))
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """The gauges of both loops, as they stand (a /metrics scrape reads them: it must not
        step the controller, or t would move faster the more often Prometheus scrapes)."""
        m = self.metrics
        m.threshold.set(self.controller.t)
        m.planner_threshold.set(self.controller.t_star)
        m.egress.set(self.controller.egress_gbps())
        m.link_util.set(self.controller.utilisation())
        if self.gc_pacer is not None:
            for gen, n in enumerate(self.gc_pacer.collections):
                m.gc_collections.labels(str(gen)).set(n)
            m.gc_longest.set(self.gc_pacer.longest_s)
        if self.controller.advice is not None:
            m.split.labels("prefill").set(self.controller.advice.n_prefill)
            m.split.labels("decode").set(self.controller.advice.n_decode)
