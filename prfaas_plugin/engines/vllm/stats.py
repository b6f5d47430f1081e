"""Connector telemetry through vLLM's own channel, so it shows on the server's ``/metrics`` and in
its periodic "KV Transfer metrics" log line.

The connector's worker half runs in vLLM's worker process while ``/metrics`` is served by the API
server process, so a plain prometheus_client counter in the worker is never scraped. vLLM ships
each step's ``get_kv_connector_stats()`` from the worker to the scheduler and on to the API
server's loggers, which call the connector class's ``build_kv_connector_stats`` and
``build_prom_metrics``: the stats must therefore be plain serialisable lists.
"""

from __future__ import annotations

from collections import Counter as _Tally
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.protocol.metrics import MetricSpec

_KEYS = (
    "load_bytes",
    "load_seconds",
    "load_failures",
    "sent_bytes",
    "send_failures",
    # scheduler side, decode-initiated offload: [decision, reason, uncached tokens, t] each
    "offload_decisions",
    "offload_failures",
)
#: Bucket bounds of the uncached-length histogram (tokens).
UNCACHED_BUCKETS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
#: ``[capacity, in_use]`` snapshots of the pinned staging pool (GPU caches), sent along with
#: the other keys but never making an interval non-empty on their own
_POOL = "staging_pool"


@dataclass
class PrfaaSConnectorStats(KVConnectorStats):
    """One interval of transfers. ``*_failures`` hold the error class names (typed errors of
    the transfer engine: TransferTimeout, PeerGone, AuthError, ...)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {k: [] for k in _KEYS}

    # -- recording (worker side) -----------------------------------------------------------------
    def record_load(self, nbytes: int, seconds: float) -> None:
        self.data["load_bytes"].append(int(nbytes))
        self.data["load_seconds"].append(float(seconds))

    def record_load_failure(self, error: str) -> None:
        self.data["load_failures"].append(error)

    def record_sent(self, nbytes: int) -> None:
        self.data["sent_bytes"].append(int(nbytes))

    def record_send_failure(self, error: str) -> None:
        self.data["send_failures"].append(error)

    # -- recording (scheduler side) --------------------------------------------------------------
    def record_decision(self, decision: str, reason: str, uncached: int, threshold: float) -> None:
        self.data["offload_decisions"].append([decision, reason, int(uncached), float(threshold)])

    def record_offload_failure(self, kind: str) -> None:
        self.data["offload_failures"].append(kind)

    def record_staging_pool(self, capacity: int, in_use: int) -> None:
        self.data.setdefault(_POOL, []).append([int(capacity), int(in_use)])

    def clone_and_reset(self) -> PrfaaSConnectorStats:
        out = PrfaaSConnectorStats(data={k: list(v) for k, v in self.data.items()})
        self.reset()
        return out

    # -- vLLM's interface ---------------------------------------------------------------------------
    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _KEYS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k in (*_KEYS, _POOL):
            self.data.setdefault(k, []).extend(other.data.get(k, []))
        return self

    def reduce(self) -> dict[str, int | float]:
        loads, secs = self.data["load_bytes"], self.data["load_seconds"]
        out: dict[str, int | float] = {
            "KV loads": len(loads),
            "MB loaded": round(sum(loads) / 2**20, 3),
            "Avg load time (ms)": round(1e3 * sum(secs) / len(secs), 2) if secs else 0,
            "Load failures (recomputed)": len(self.data["load_failures"]),
            "MB sent": round(sum(self.data["sent_bytes"]) / 2**20, 3),
            "Send failures": len(self.data["send_failures"]),
        }
        for name, n in sorted(_Tally(self.data["load_failures"]).items()):
            out[f"Load failures: {name}"] = n
        decisions = self.data.get("offload_decisions", [])
        if decisions:
            out["Offloaded here"] = sum(1 for d in decisions if d[0] == "offload")
            out["Kept local here"] = sum(1 for d in decisions if d[0] != "offload")
        if self.data.get("offload_failures"):
            out["Offload failures (prefilled locally)"] = len(self.data["offload_failures"])
        return out


class PrfaaSPromMetrics(KVConnectorPromMetrics):
    """``vllm:prfaas_*`` series on the instance's ``/metrics``, one child per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def counter(spec: MetricSpec) -> dict[int, Any]:
            return create_metric_per_engine(
                self._counter_cls(name=spec.name, documentation=spec.help, labelnames=labelnames),
                per_engine_labelvalues,
            )

        self.loads = counter(M.VLLM_KV_LOADS)
        self.load_bytes = counter(M.VLLM_KV_RECEIVED_BYTES)
        self.load_failures = counter(M.VLLM_KV_LOAD_FAILURES)
        self.sent_bytes = counter(M.VLLM_KV_SENT_BYTES)
        self.send_failures = counter(M.VLLM_KV_SEND_FAILURES)
        histogram_cls: Any = self._histogram_cls  # vLLM types it as a union of metric classes
        hist = histogram_cls(
            name=M.VLLM_KV_LOAD_SECONDS.name,
            documentation=M.VLLM_KV_LOAD_SECONDS.help,
            buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
            labelnames=labelnames,
        )
        self.load_seconds: dict[int, Any] = create_metric_per_engine(hist, per_engine_labelvalues)
        # series with labels of their own beyond the engine's: children made per observation
        self._engine_labels = per_engine_labelvalues
        counter_cls: Any = self._counter_cls  # vLLM types these as a union of metric classes
        gauge_cls: Any = self._gauge_cls
        self.decisions = counter_cls(
            name=M.VLLM_OFFLOAD_DECISIONS.name,
            documentation=M.VLLM_OFFLOAD_DECISIONS.help,
            labelnames=[*labelnames, *M.VLLM_OFFLOAD_DECISIONS.labels],
        )
        self.uncached = histogram_cls(
            name=M.VLLM_OFFLOAD_UNCACHED_TOKENS.name,
            documentation=M.VLLM_OFFLOAD_UNCACHED_TOKENS.help,
            buckets=UNCACHED_BUCKETS,
            labelnames=[*labelnames, *M.VLLM_OFFLOAD_UNCACHED_TOKENS.labels],
        )
        self.offload_failures = counter_cls(
            name=M.VLLM_OFFLOAD_FAILURES.name,
            documentation=M.VLLM_OFFLOAD_FAILURES.help,
            labelnames=[*labelnames, *M.VLLM_OFFLOAD_FAILURES.labels],
        )

        def gauge(spec: MetricSpec) -> dict[int, Any]:
            return create_metric_per_engine(
                gauge_cls(
                    name=spec.name, documentation=spec.help, labelnames=labelnames, multiprocess_mode="mostrecent"
                ),
                per_engine_labelvalues,
            )

        self.threshold = gauge(M.VLLM_OFFLOAD_THRESHOLD)
        self.pool_capacity = gauge(M.VLLM_STAGING_POOL_CAPACITY)
        self.pool_in_use = gauge(M.VLLM_STAGING_POOL_IN_USE)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        if d.get("load_bytes"):
            self.loads[engine_idx].inc(len(d["load_bytes"]))
            self.load_bytes[engine_idx].inc(sum(d["load_bytes"]))
        for s in d.get("load_seconds", []):
            self.load_seconds[engine_idx].observe(s)
        if d.get("load_failures"):
            self.load_failures[engine_idx].inc(len(d["load_failures"]))
        if d.get("sent_bytes"):
            self.sent_bytes[engine_idx].inc(sum(d["sent_bytes"]))
        if d.get("send_failures"):
            self.send_failures[engine_idx].inc(len(d["send_failures"]))
        engine = self._engine_labels.get(engine_idx, [])
        for decision, reason, uncached, threshold in d.get("offload_decisions", []):
            self.decisions.labels(*engine, decision, reason).inc()
            self.uncached.labels(*engine, decision).observe(uncached)
            self.threshold[engine_idx].set(threshold)
        for kind in d.get("offload_failures", []):
            self.offload_failures.labels(*engine, kind).inc()
        if d.get(_POOL):
            capacity, in_use = d[_POOL][-1]
            self.pool_capacity[engine_idx].set(capacity)
            self.pool_in_use[engine_idx].set(in_use)
