"""Prometheus exposition of the transfer telemetry. The collector reads ``stats()`` at scrape
time, so the Python API and the metrics are the same numbers. Names and help come from
protocol/metrics.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.protocol.metrics import MetricSpec

#: Per-peer sender metrics and the ``stats()["peers"][peer]`` key each one reads.
_PEER: tuple[tuple[MetricSpec, str], ...] = (
    (M.T_PEER_GOODPUT, "goodput_gbps"),
    (M.T_PEER_IN_FLIGHT, "bytes_in_flight"),
    (M.T_PEER_QUEUE, "queue_chunks"),
    (M.T_PEER_CONNECTIONS, "connections"),
    (M.T_PEER_RTT, "rtt_ms"),
    (M.T_PEER_SENT, "bytes_sent"),
    (M.T_PEER_CONFIRMED, "bytes_confirmed"),
    (M.T_PEER_RESENT, "chunks_resent"),
    (M.T_PEER_CONN_FAILURES, "connection_failures"),
    (M.T_PEER_RETRANSMITS, "total_retrans"),
)
#: Receiver metrics without labels and the ``stats()`` key each one reads.
_RECEIVER: tuple[tuple[MetricSpec, str], ...] = (
    (M.T_RX_LANDED, "bytes_landed"),
    (M.T_RX_CHECKSUM_FAILURES, "checksum_failures"),
    (M.T_RX_DUPLICATES, "duplicate_chunks"),
    (M.T_RX_AUTH_REFUSALS, "auth_refusals"),
    (M.T_RX_ACTIVE, "sessions_active"),
    (M.T_RX_CONNECTIONS, "data_connections"),
    (M.T_RX_GOODPUT, "goodput_gbps"),
)


def _family(spec: MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    return cls(spec.name, spec.help, labels=list(spec.labels))


class TransferCollector(Collector):
    """Register with ``TransferCollector(sender=..., receiver=..., registry=...)``; either side
    may be omitted (a process usually runs one of them)."""

    def __init__(self, sender: Any = None, receiver: Any = None, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.sender, self.receiver = sender, receiver
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        if self.sender is not None:
            yield from self._sender_metrics(self.sender.stats())
        if self.receiver is not None:
            yield from self._receiver_metrics(self.receiver.stats())

    @staticmethod
    def _sender_metrics(st: dict[str, Any]) -> Iterator[Metric]:
        for spec, key in _PEER:
            fam = _family(spec)
            for peer, d in st["peers"].items():
                if key in d:
                    fam.add_metric([peer], float(d[key]))
            yield fam
        req = _family(M.T_SEND_REQUESTS)
        req.add_metric(["ok"], st["requests_ok"])
        for name, n in st["requests_failed"].items():
            req.add_metric([name], n)
        yield req
        active = _family(M.T_SEND_ACTIVE)
        active.add_metric([], st["requests_active"])
        yield active
        lat = _family(M.T_REQUEST_SECONDS)
        if st["request_seconds_p50"] is not None:
            lat.add_metric(["0.5"], st["request_seconds_p50"])
            lat.add_metric(["1"], st["request_seconds_max"])
        yield lat

    @staticmethod
    def _receiver_metrics(st: dict[str, Any]) -> Iterator[Metric]:
        for spec, key in _RECEIVER:
            fam = _family(spec)
            fam.add_metric([], st[key])
            yield fam
        ses = _family(M.T_RX_SESSIONS)
        ses.add_metric(["ok"], st["sessions_ok"])
        for name, n in st["sessions_failed"].items():
            ses.add_metric([name], n)
        yield ses
