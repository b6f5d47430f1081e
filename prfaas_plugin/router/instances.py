"""The backend instances the router knows: role, health, load, and the shared HTTP client."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

from prfaas_plugin.router.config import InstanceSpec, RouterConfig
from prfaas_plugin.router.upstream import Unreachable, Upstream, UpstreamError

log = logging.getLogger("prfaas.router")

Role = Literal["prefill", "decode", "both"]


@dataclass
class Instance:
    url: str
    cluster: str
    cluster_kind: Literal["prfaas", "local"]
    role: Role
    kv_endpoint: str | None = None
    kv_events: str | None = None
    name: str = ""
    bootstrap_port: int = 8998
    #: How this instance hands KV to a decode instance when it prefills for one (its cluster's
    #: ``transfer``): the key of the router's per-hop protocol (router/pd.py, ``hop_protocols``).
    transfer: str = "prfaas"
    healthy: bool = True
    last_error: str = ""
    slow_probes: int = 0  # consecutive health probes that timed out or were cut
    probed_at: float = -math.inf  # monotonic time its last health probe ended
    inflight: int = 0  # requests the router has open on it (its queue depth, as the router sees it)
    served: int = 0
    draining: bool = False  # taken out of routing (a role switch, or an operator: /admin/instances)
    #: The engine's own running + waiting requests at its last reading (router/engine_load.py);
    #: None: never read, or it exports no queue gauges.
    reported: int | None = None
    reported_at: float = 0.0
    report_stale_s: float = 10.0
    report_gen: int = 0  # bumped at each reading: a lease taken before it is already counted in it
    opened_since_report: int = 0  # requests this replica opened since the last reading, still open

    def set_reported(self, value: int, now: float) -> None:
        self.reported, self.reported_at = value, now
        self.report_gen += 1
        self.opened_since_report = 0

    def opened(self) -> int:
        """A lease was taken; returns the reading generation to hand back to :meth:`closed`."""
        self.inflight += 1
        self.opened_since_report += 1
        return self.report_gen

    def closed(self, gen: int) -> None:
        self.inflight -= 1
        if gen == self.report_gen:
            self.opened_since_report -= 1

    @property
    def load(self) -> int:
        """Requests on the instance as placement counts them: the engine's fresh reading plus
        what this replica opened since, never below this replica's own open requests."""
        if self.reported is None or time.monotonic() - self.reported_at > self.report_stale_s:
            return self.inflight
        return max(self.inflight, self.reported + self.opened_since_report)

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")


@dataclass
class Fleet:
    instances: list[Instance] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> Fleet:
        out = []
        for c in cfg.clusters:
            by_role: tuple[tuple[Role, list[InstanceSpec]], ...] = (
                ("prefill", c.prefill),
                ("decode", c.decode),
                ("both", c.both),
            )
            for role, specs in by_role:
                for s in specs:
                    out.append(
                        Instance(
                            s.url,
                            c.name,
                            c.kind,
                            role,
                            s.kv_endpoint,
                            s.kv_events,
                            s.name or s.url,
                            s.bootstrap_port,
                            transfer=c.transfer,
                            report_stale_s=cfg.replicas.load_stale_s,
                        )
                    )
        return cls(out)

    def in_cluster(self, cluster: str) -> list[Instance]:
        return [i for i in self.instances if i.cluster == cluster]

    def of_kind(self, kind: str) -> list[Instance]:
        return [i for i in self.instances if i.cluster_kind == kind]

    def queue_depth(self, kind: str) -> int:
        return sum(i.load for i in self.of_kind(kind))

    def due_for_probe(self, now: float, every_s: float, down_every_s: float) -> list[Instance]:
        """Instances whose next /health probe is due: a healthy one ``every_s`` after its last
        probe, one marked down (by a probe, or by a refused request between probes) after
        ``down_every_s``, so an engine that comes back takes traffic again within that much."""
        return [i for i in self.instances if now - i.probed_at >= (every_s if i.healthy else down_every_s)]

    async def check_health(
        self, client: Upstream, timeout_s: float, slow_limit: int = 1, only: list[Instance] | None = None
    ) -> None:
        """Probe every instance's /health (or ``only`` those). A refused connection or a non-200
        status marks an instance down at once; a probe that times out or is cut only after
        ``slow_limit`` in a row, because a CPU-bound engine in a long prefill answers late
        without being down (a single late probe used to send its traffic elsewhere). One good
        answer marks it up."""

        async def one(inst: Instance) -> None:
            try:
                status = await client.get_status(f"{inst.url}/health", timeout_s)
                ok, err, inst.slow_probes = status == 200, f"HTTP {status}", 0
            except Unreachable as exc:
                ok, err, inst.slow_probes = False, str(exc), 0
            except UpstreamError as exc:
                inst.slow_probes += 1
                ok, err = inst.slow_probes < slow_limit and inst.healthy, str(exc)
                if ok:
                    log.info("instance %s: slow health probe %d/%d: %s", inst.url, inst.slow_probes, slow_limit, exc)
            if ok != inst.healthy:
                log.warning(
                    "instance %s (%s/%s) is now %s%s",
                    inst.url,
                    inst.cluster,
                    inst.role,
                    "healthy" if ok else "UNHEALTHY",
                    "" if ok else f": {err}",
                )
            inst.healthy, inst.last_error = ok, "" if ok else err
            inst.probed_at = time.monotonic()

        await asyncio.gather(*(one(i) for i in (self.instances if only is None else only)))

    def health_report(self) -> list[dict]:
        return [
            {
                "url": i.url,
                "cluster": i.cluster,
                "role": i.role,
                "healthy": i.healthy,
                "error": i.last_error,
                "inflight": i.inflight,
                "load": i.load,
                "reported": i.reported,
                "draining": i.draining,
            }
            for i in self.instances
        ]
