"""The router's Prometheus metrics, on a registry of its own (one per app, so tests can run
several routers in one process). Names, labels and help come from protocol/metrics.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.protocol.metrics import MetricSpec

_LEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25)
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(s: MetricSpec) -> Counter:
            return Counter(s.name, s.help, s.labels, registry=r)

        def gauge(s: MetricSpec) -> Gauge:
            return Gauge(s.name, s.help, s.labels, registry=r)

        def histogram(s: MetricSpec, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(s.name, s.help, s.labels, buckets=buckets, registry=r)

        self.requests = counter(M.ROUTER_REQUESTS)
        self.decisions = counter(M.ROUTER_DECISIONS)
        self.uncached = histogram(M.ROUTER_UNCACHED_TOKENS, _LEN_BUCKETS)
        self.threshold = gauge(M.ROUTER_THRESHOLD)
        self.planner_threshold = gauge(M.ROUTER_PLANNER_THRESHOLD)
        self.offload = gauge(M.ROUTER_OFFLOAD_FRACTION)
        self.egress = gauge(M.ROUTER_EGRESS_GBPS)
        self.link_util = gauge(M.ROUTER_LINK_UTILISATION)
        self.queue = gauge(M.ROUTER_QUEUE_DEPTH)
        self.ttft = histogram(M.ROUTER_TTFT, _TIME_BUCKETS)
        self.overhead = histogram(M.ROUTER_OVERHEAD, _OVERHEAD_BUCKETS)
        self.fallbacks = counter(M.ROUTER_FALLBACKS)
        self.kv_bytes = counter(M.ROUTER_KV_BYTES)
        self.egress_estimated = counter(M.ROUTER_EGRESS_ESTIMATED)
        self.split = gauge(M.ROUTER_SPLIT)
        self.role_switches = counter(M.ROUTER_ROLE_SWITCHES)
        self.healthy = gauge(M.ROUTER_INSTANCE_HEALTHY)
        self.gc_collections = gauge(M.ROUTER_GC_COLLECTIONS)
        self.gc_longest = gauge(M.ROUTER_GC_LONGEST)
        self.instance_load = gauge(M.ROUTER_INSTANCE_LOAD)
