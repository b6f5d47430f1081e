"""The router's Prometheus metrics, on a registry of its own (one per app, so tests can run
several routers in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25)
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "prfaas_router_requests", "Requests by route and outcome", ["route", "outcome"], registry=r
        )
        self.decisions = Counter(
            "prfaas_router_decisions", "Routing decisions by route and reason", ["route", "reason"], registry=r
        )
        self.uncached = Histogram(
            "prfaas_router_uncached_tokens",
            "Uncached prompt length l by route",
            ["route"],
            buckets=_LEN_BUCKETS,
            registry=r,
        )
        self.threshold = Gauge("prfaas_router_threshold_tokens", "Current routing threshold t", registry=r)
        self.planner_threshold = Gauge(
            "prfaas_router_planner_threshold_tokens", "Planner optimum t* for the observed lengths", registry=r
        )
        self.offload = Gauge("prfaas_router_offload_fraction", "Fraction of recent requests sent to PrfaaS", registry=r)
        self.egress = Gauge(
            "prfaas_router_egress_gbps",
            "PrfaaS KV egress over a sliding window (producers' sent-bytes counters, else their reported or estimated bytes)",
            registry=r,
        )
        self.link_util = Gauge("prfaas_router_link_utilisation", "Egress over link capacity", registry=r)
        self.queue = Gauge(
            "prfaas_router_queue_depth", "Requests open on an instance", ["cluster", "instance"], registry=r
        )
        self.ttft = Histogram(
            "prfaas_router_ttft_seconds",
            "Time to first token by phase",
            ["route", "phase"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "prfaas_router_overhead_seconds",
            "The router's own time in a request's time to first byte: from the request "
            "reaching the app to its upstream request being written (less connection "
            "set-up), plus from the first answer bytes arriving to their relay to the "
            "client (requests that neither fell back nor were re-placed)",
            ["route"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "prfaas_router_fallbacks", "Requests that fell back to local prefill", ["reason"], registry=r
        )
        self.kv_bytes = Counter("prfaas_router_kv_bytes", "KV bytes producers reported sending", ["route"], registry=r)
        self.egress_estimated = Counter(
            "prfaas_router_egress_estimated_bytes",
            "PrfaaS egress estimated from uncached lengths (producers that report "
            "no bytes and expose no sent-bytes counter, e.g. SGLang)",
            registry=r,
        )
        self.split = Gauge(
            "prfaas_router_split_recommendation",
            "Long-term loop: recommended local P/D instances",
            ["role"],
            registry=r,
        )
        self.role_switches = Counter(
            "prfaas_router_role_switches",
            "Run-time P/D role switches the router asked for (threshold.apply_split), by outcome",
            ["outcome"],
            registry=r,
        )
        self.healthy = Gauge(
            "prfaas_router_instance_healthy",
            "1 while the instance counts as healthy (refused or non-200: 0 at once; "
            "timeouts: after timeouts.health_failures in a row)",
            ["cluster", "instance"],
            registry=r,
        )
        self.gc_collections = Gauge(
            "prfaas_router_gc_collections",
            "Paced garbage collections made (router.gc), by generation",
            ["generation"],
            registry=r,
        )
        self.gc_longest = Gauge(
            "prfaas_router_gc_longest_seconds", "Longest paced garbage collection so far", registry=r
        )
