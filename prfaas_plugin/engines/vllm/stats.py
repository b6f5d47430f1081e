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

_KEYS = ("load_bytes", "load_seconds", "load_failures", "sent_bytes", "send_failures")
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

        gauge_cls: Any = self._gauge_cls  # vLLM types it as a union of metric classes

        def gauge(spec: MetricSpec) -> dict[int, Any]:
            return create_metric_per_engine(
                gauge_cls(
                    name=spec.name, documentation=spec.help, labelnames=labelnames, multiprocess_mode="mostrecent"
                ),
                per_engine_labelvalues,
            )

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
        if d.get(_POOL):
            capacity, in_use = d[_POOL][-1]
            self.pool_capacity[engine_idx].set(capacity)
            self.pool_in_use[engine_idx].set(in_use)
