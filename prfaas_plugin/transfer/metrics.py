"""Prometheus exposition of the transfer telemetry. The collector reads ``stats()`` at scrape
time, so the Python API and the metrics are the same numbers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry


class TransferCollector(Collector):
    """Register with ``TransferCollector(sender=..., receiver=..., registry=...)``; either side
    may be omitted (a process usually runs one of them)."""

    def __init__(
        self,
        sender: Any = None,
        receiver: Any = None,
        registry: CollectorRegistry | None = REGISTRY,
        prefix: str = "prfaas_transfer",
    ) -> None:
        self.sender, self.receiver, self.prefix = sender, receiver, prefix
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Any]:
        p = self.prefix
        if self.sender is not None:
            st = self.sender.stats()
            gauges = {
                "goodput_gbps": ("Confirmed goodput towards the peer over the last 2 s (Gbit/s)", "goodput_gbps"),
                "bytes_in_flight": ("Bytes sent but not yet confirmed by the peer", "bytes_in_flight"),
                "queue_chunks": ("Chunks waiting for a data connection", "queue_chunks"),
                "connections": ("Open data connections to the peer", "connections"),
                "tcp_rtt_ms": ("Mean smoothed TCP RTT of the data connections (TCP_INFO)", "rtt_ms"),
            }
            counters = {
                "sent_bytes": ("Payload bytes written to the peer (incl. resends)", "bytes_sent"),
                "confirmed_bytes": ("Payload bytes the peer confirmed", "bytes_confirmed"),
                "resent_chunks": ("Chunks sent again (checksum failure or lost connection)", "chunks_resent"),
                "connection_failures": ("Data connections that failed", "connection_failures"),
                "tcp_retransmits": ("TCP segments retransmitted on live data connections (TCP_INFO)", "total_retrans"),
            }
            fams = {k: GaugeMetricFamily(f"{p}_peer_{k}", h, labels=["peer"]) for k, (h, _) in gauges.items()}
            cfams = {k: CounterMetricFamily(f"{p}_peer_{k}", h, labels=["peer"]) for k, (h, _) in counters.items()}
            for peer, d in st["peers"].items():
                for k, (_, key) in gauges.items():
                    if key in d:
                        fams[k].add_metric([peer], float(d[key]))
                for k, (_, key) in counters.items():
                    if key in d:
                        cfams[k].add_metric([peer], float(d[key]))
            yield from fams.values()
            yield from cfams.values()
            req = CounterMetricFamily(f"{p}_send_requests", "Send sessions finished, by outcome", labels=["outcome"])
            req.add_metric(["ok"], st["requests_ok"])
            for name, n in st["requests_failed"].items():
                req.add_metric([name], n)
            yield req
            active = GaugeMetricFamily(f"{p}_send_requests_active", "Send sessions in progress")
            active.add_metric([], st["requests_active"])
            yield active
            lat = GaugeMetricFamily(
                f"{p}_request_seconds", "Open-to-confirmed time of recent requests", labels=["quantile"]
            )
            if st["request_seconds_p50"] is not None:
                lat.add_metric(["0.5"], st["request_seconds_p50"])
                lat.add_metric(["1"], st["request_seconds_max"])
            yield lat
        if self.receiver is not None:
            st = self.receiver.stats()
            for key, help_ in (
                ("bytes_landed", "Payload bytes landed and verified"),
                ("checksum_failures", "Chunks that failed their checksum"),
                ("duplicate_chunks", "Chunks received twice and dropped"),
                ("auth_refusals", "Opens refused for an unknown session or a wrong token"),
            ):
                c = CounterMetricFamily(f"{p}_receiver_{key}", help_)
                c.add_metric([], st[key])
                yield c
            ses = CounterMetricFamily(
                f"{p}_receive_sessions", "Receive sessions finished, by outcome", labels=["outcome"]
            )
            ses.add_metric(["ok"], st["sessions_ok"])
            for name, n in st["sessions_failed"].items():
                ses.add_metric([name], n)
            yield ses
            for key, help_ in (
                ("sessions_active", "Announced or open receive sessions"),
                ("data_connections", "Open inbound data connections"),
                ("goodput_gbps", "Landed goodput over the last 2 s (Gbit/s)"),
            ):
                g = GaugeMetricFamily(f"{p}_receiver_{key}", help_)
                g.add_metric([], st[key])
                yield g
