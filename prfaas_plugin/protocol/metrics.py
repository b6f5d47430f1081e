"""Every Prometheus metric the project exports or reads: name, type, labels and help, once.

Exporters build their metrics from these specs and readers (the router's egress loop, tests,
benches, dashboards in docs) take the names from here, so a rename cannot leave a reader
scraping a name nobody exports. Counters are declared without ``_total``; ``exposed`` is the
name as it appears on ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def exposed(self) -> str:
        """The sample name on ``/metrics`` (prometheus_client appends ``_total`` to counters)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


def _c(name: str, help_: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "counter", help_, labels)


def _g(name: str, help_: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help_, labels)


def _h(name: str, help_: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "histogram", help_, labels)


# -- the router (router/metrics.py) -------------------------------------------------------------
ROUTER_REQUESTS = _c("prfaas_router_requests", "Requests by route and outcome", "route", "outcome")
ROUTER_DECISIONS = _c("prfaas_router_decisions", "Routing decisions by route and reason", "route", "reason")
ROUTER_UNCACHED_TOKENS = _h("prfaas_router_uncached_tokens", "Uncached prompt length l by route", "route")
ROUTER_THRESHOLD = _g("prfaas_router_threshold_tokens", "Current routing threshold t")
ROUTER_PLANNER_THRESHOLD = _g("prfaas_router_planner_threshold_tokens", "Planner optimum t* for the observed lengths")
ROUTER_OFFLOAD_FRACTION = _g("prfaas_router_offload_fraction", "Fraction of recent requests sent to PrfaaS")
ROUTER_EGRESS_GBPS = _g(
    "prfaas_router_egress_gbps",
    "PrfaaS KV egress over a sliding window (producers' sent-bytes counters, else their reported or estimated bytes)",
)
ROUTER_LINK_UTILISATION = _g("prfaas_router_link_utilisation", "Egress over link capacity")
ROUTER_QUEUE_DEPTH = _g("prfaas_router_queue_depth", "Requests open on an instance", "cluster", "instance")
ROUTER_TTFT = _h("prfaas_router_ttft_seconds", "Time to first token by phase", "route", "phase")
ROUTER_OVERHEAD = _h(
    "prfaas_router_overhead_seconds",
    "The router's own time in a request's time to first byte: from the request reaching the app to its upstream "
    "request being written (less connection set-up), plus from the first answer bytes arriving to their relay to "
    "the client (requests that neither fell back nor were re-placed)",
    "route",
)
ROUTER_FALLBACKS = _c("prfaas_router_fallbacks", "Requests that fell back to local prefill", "reason")
ROUTER_KV_BYTES = _c("prfaas_router_kv_bytes", "KV bytes producers reported sending", "route")
ROUTER_EGRESS_ESTIMATED = _c(
    "prfaas_router_egress_estimated_bytes",
    "PrfaaS egress estimated from uncached lengths (producers that report no bytes and expose no sent-bytes "
    "counter, e.g. SGLang)",
)
ROUTER_SPLIT = _g("prfaas_router_split_recommendation", "Long-term loop: recommended local P/D instances", "role")
ROUTER_ROLE_SWITCHES = _c(
    "prfaas_router_role_switches",
    "Run-time P/D role switches the router asked for (threshold.apply_split), by outcome",
    "outcome",
)
ROUTER_INSTANCE_HEALTHY = _g(
    "prfaas_router_instance_healthy",
    "1 while the instance counts as healthy (refused or non-200: 0 at once; timeouts: after "
    "timeouts.health_failures in a row)",
    "cluster",
    "instance",
)
ROUTER_GC_COLLECTIONS = _g(
    "prfaas_router_gc_collections", "Paced garbage collections made (router.gc), by generation", "generation"
)
ROUTER_GC_LONGEST = _g("prfaas_router_gc_longest_seconds", "Longest paced garbage collection so far")
ROUTER_INSTANCE_LOAD = _g(
    "prfaas_router_instance_load",
    "Requests on an instance as placement sees it: the engine's reported running + waiting (replicas.load_scrape_s) "
    "plus what this replica opened there since, never below this replica's own open requests",
    "cluster",
    "instance",
)

ROUTER = (
    ROUTER_REQUESTS,
    ROUTER_DECISIONS,
    ROUTER_UNCACHED_TOKENS,
    ROUTER_THRESHOLD,
    ROUTER_PLANNER_THRESHOLD,
    ROUTER_OFFLOAD_FRACTION,
    ROUTER_EGRESS_GBPS,
    ROUTER_LINK_UTILISATION,
    ROUTER_QUEUE_DEPTH,
    ROUTER_TTFT,
    ROUTER_OVERHEAD,
    ROUTER_FALLBACKS,
    ROUTER_KV_BYTES,
    ROUTER_EGRESS_ESTIMATED,
    ROUTER_SPLIT,
    ROUTER_ROLE_SWITCHES,
    ROUTER_INSTANCE_HEALTHY,
    ROUTER_GC_COLLECTIONS,
    ROUTER_GC_LONGEST,
    ROUTER_INSTANCE_LOAD,
)

# -- the vLLM connector (engines/vllm/stats.py), on vLLM's /metrics -----------------------------
VLLM_KV_LOADS = _c("vllm:prfaas_kv_loads", "KV loads received over the prfaas connector")
VLLM_KV_RECEIVED_BYTES = _c("vllm:prfaas_kv_received_bytes", "KV bytes received over the prfaas connector")
VLLM_KV_LOAD_FAILURES = _c(
    "vllm:prfaas_kv_load_failures", "KV loads that failed or timed out; the decode side recomputed the prefill"
)
VLLM_KV_SENT_BYTES = _c("vllm:prfaas_kv_sent_bytes", "KV bytes the receiver confirmed (producer side)")
VLLM_KV_SEND_FAILURES = _c("vllm:prfaas_kv_send_failures", "Producer transfers that failed; their blocks were freed")
VLLM_KV_LOAD_SECONDS = _h("vllm:prfaas_kv_load_seconds", "Time from announcing a KV load to its last byte landing")
VLLM_OFFLOAD_DECISIONS = _c(
    "vllm:prfaas_offload_decisions",
    "In-engine offload decisions (option offload) by decision (offload, local) and reason",
    "decision",
    "reason",
)
VLLM_OFFLOAD_UNCACHED_TOKENS = _h(
    "vllm:prfaas_offload_uncached_tokens",
    "Exact uncached prompt length at the in-engine decision (prompt minus this instance's prefix-cache hit), "
    "by decision",
    "decision",
)
VLLM_OFFLOAD_THRESHOLD = _g("vllm:prfaas_offload_threshold_tokens", "The threshold t the last in-engine decision used")
VLLM_OFFLOAD_FAILURES = _c(
    "vllm:prfaas_offload_failures",
    "Offloaded prefills that failed (unreachable, timeout, connection_lost, http_error, transfer_failed, "
    "no_instance, error); the request prefilled locally",
    "kind",
)
VLLM_STAGING_POOL_CAPACITY = _g(
    "vllm:prfaas_staging_pool_capacity_bytes", "Pinned host staging allocated for KV transfers (GPU caches)"
)
VLLM_STAGING_POOL_IN_USE = _g(
    "vllm:prfaas_staging_pool_in_use_bytes", "Pinned host staging held by KV transfers in flight; at capacity they wait"
)

VLLM = (
    VLLM_KV_LOADS,
    VLLM_KV_RECEIVED_BYTES,
    VLLM_KV_LOAD_FAILURES,
    VLLM_KV_SENT_BYTES,
    VLLM_KV_SEND_FAILURES,
    VLLM_KV_LOAD_SECONDS,
    VLLM_OFFLOAD_DECISIONS,
    VLLM_OFFLOAD_UNCACHED_TOKENS,
    VLLM_OFFLOAD_THRESHOLD,
    VLLM_OFFLOAD_FAILURES,
    VLLM_STAGING_POOL_CAPACITY,
    VLLM_STAGING_POOL_IN_USE,
)

# -- the SGLang backend (engines/sglang/metrics.py), on SGLang's /metrics with --enable-metrics --
SGLANG_KV_SENT_BYTES = _c("sglang:prfaas_kv_sent_bytes", "KV bytes the PrfaaS receivers confirmed (prefill side)")

SGLANG_STAGING_POOL_CAPACITY = _g(
    "sglang:prfaas_staging_pool_capacity_bytes", "Pinned host staging allocated for KV transfers (GPU pools)"
)
SGLANG_STAGING_POOL_IN_USE = _g(
    "sglang:prfaas_staging_pool_in_use_bytes",
    "Pinned host staging held by KV transfers in flight; at capacity they wait",
)

SGLANG = (SGLANG_KV_SENT_BYTES, SGLANG_STAGING_POOL_CAPACITY, SGLANG_STAGING_POOL_IN_USE)

#: Producers' confirmed-bytes counters the router's bandwidth loop reads (router/egress.py).
SENT_BYTES = (VLLM_KV_SENT_BYTES, SGLANG_KV_SENT_BYTES)

# -- the transfer engine (transfer/metrics.py) ---------------------------------------------------
T_PEER_GOODPUT = _g(
    "prfaas_transfer_peer_goodput_gbps", "Confirmed goodput towards the peer over the last 2 s (Gbit/s)", "peer"
)
T_PEER_IN_FLIGHT = _g("prfaas_transfer_peer_bytes_in_flight", "Bytes sent but not yet confirmed by the peer", "peer")
T_PEER_QUEUE = _g("prfaas_transfer_peer_queue_chunks", "Chunks waiting for a data connection", "peer")
T_PEER_CONNECTIONS = _g("prfaas_transfer_peer_connections", "Open data connections to the peer", "peer")
T_PEER_RTT = _g("prfaas_transfer_peer_tcp_rtt_ms", "Mean smoothed TCP RTT of the data connections (TCP_INFO)", "peer")
T_PEER_SENT = _c("prfaas_transfer_peer_sent_bytes", "Payload bytes written to the peer (incl. resends)", "peer")
T_PEER_CONFIRMED = _c("prfaas_transfer_peer_confirmed_bytes", "Payload bytes the peer confirmed", "peer")
T_PEER_RESENT = _c(
    "prfaas_transfer_peer_resent_chunks", "Chunks sent again (checksum failure or lost connection)", "peer"
)
T_PEER_CONN_FAILURES = _c("prfaas_transfer_peer_connection_failures", "Data connections that failed", "peer")
T_PEER_RETRANSMITS = _c(
    "prfaas_transfer_peer_tcp_retransmits",
    "TCP segments retransmitted on live data connections (TCP_INFO)",
    "peer",
)
T_SEND_REQUESTS = _c("prfaas_transfer_send_requests", "Send sessions finished, by outcome", "outcome")
T_SEND_ACTIVE = _g("prfaas_transfer_send_requests_active", "Send sessions in progress")
T_REQUEST_SECONDS = _g("prfaas_transfer_request_seconds", "Open-to-confirmed time of recent requests", "quantile")
T_RX_LANDED = _c("prfaas_transfer_receiver_bytes_landed", "Payload bytes landed and verified")
T_RX_CHECKSUM_FAILURES = _c("prfaas_transfer_receiver_checksum_failures", "Chunks that failed their checksum")
T_RX_DUPLICATES = _c("prfaas_transfer_receiver_duplicate_chunks", "Chunks received twice and dropped")
T_RX_AUTH_REFUSALS = _c(
    "prfaas_transfer_receiver_auth_refusals", "Opens refused for an unknown session or a wrong token"
)
T_RX_SESSIONS = _c("prfaas_transfer_receive_sessions", "Receive sessions finished, by outcome", "outcome")
T_RX_ACTIVE = _g("prfaas_transfer_receiver_sessions_active", "Announced or open receive sessions")
T_RX_CONNECTIONS = _g("prfaas_transfer_receiver_data_connections", "Open inbound data connections")
T_RX_GOODPUT = _g("prfaas_transfer_receiver_goodput_gbps", "Landed goodput over the last 2 s (Gbit/s)")

TRANSFER = (
    T_PEER_GOODPUT,
    T_PEER_IN_FLIGHT,
    T_PEER_QUEUE,
    T_PEER_CONNECTIONS,
    T_PEER_RTT,
    T_PEER_SENT,
    T_PEER_CONFIRMED,
    T_PEER_RESENT,
    T_PEER_CONN_FAILURES,
    T_PEER_RETRANSMITS,
    T_SEND_REQUESTS,
    T_SEND_ACTIVE,
    T_REQUEST_SECONDS,
    T_RX_LANDED,
    T_RX_CHECKSUM_FAILURES,
    T_RX_DUPLICATES,
    T_RX_AUTH_REFUSALS,
    T_RX_SESSIONS,
    T_RX_ACTIVE,
    T_RX_CONNECTIONS,
    T_RX_GOODPUT,
)

# -- read from the engines (not exported by this project) -------------------------------------------
# The engines' own queue gauges, which every router replica reads to agree on instance load
# (router/engine_load.py): vLLM's scheduler stats and SGLang's with --enable-metrics.
ENGINE_VLLM_RUNNING = _g("vllm:num_requests_running", "vLLM: requests in model execution batches")
ENGINE_VLLM_WAITING = _g("vllm:num_requests_waiting", "vLLM: requests waiting to be processed")
ENGINE_SGLANG_RUNNING = _g("sglang:num_running_reqs", "SGLang: running requests")
ENGINE_SGLANG_WAITING = _g("sglang:num_queue_reqs", "SGLang: requests in the waiting queue")

#: (running, waiting) per engine, in the order the router tries them.
ENGINE_QUEUE = ((ENGINE_VLLM_RUNNING, ENGINE_VLLM_WAITING), (ENGINE_SGLANG_RUNNING, ENGINE_SGLANG_WAITING))

READ_FROM_ENGINES = (ENGINE_VLLM_RUNNING, ENGINE_VLLM_WAITING, ENGINE_SGLANG_RUNNING, ENGINE_SGLANG_WAITING)

ALL = ROUTER + VLLM + SGLANG + TRANSFER + READ_FROM_ENGINES
