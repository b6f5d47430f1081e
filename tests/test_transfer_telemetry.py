"""Telemetry: the Python API reflects a real transfer, the Prometheus exposition agrees with
it, and pacing holds the egress budget."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from transfer_helpers import FP, ArraySink, manifest, pair, random_items, token

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.transfer import ReceiverConfig, SenderConfig
from prfaas_plugin.transfer.metrics import TransferCollector


def _samples(registry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_stats_and_prometheus_after_transfers():
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=64 << 10, connections=2))
    reg = CollectorRegistry()
    TransferCollector(sender=tx, receiver=rx, registry=reg)
    try:
        items, data = random_items(np.random.default_rng(5), {"L0": 1_000_000, "L1": 500_000})
        for r in range(3):
            tok = token()
            rh = rx.expect(f"tm{r}", tok, FP, ArraySink())
            sh = tx.open(rx.endpoint, manifest(f"tm{r}", items), tok)
            for it in items:
                sh.send(it.name, data[it.name])
            sh.done.result(timeout=15)
            rh.done.result(timeout=15)
        st = tx.stats()
        ((peer, ps),) = st["peers"].items()
        total = 3 * 1_500_000
        assert ps["bytes_confirmed"] == total and ps["bytes_sent"] == total
        assert ps["bytes_in_flight"] == 0 and ps["queue_chunks"] == 0
        assert ps["goodput_gbps"] > 0
        assert ps["rtt_ms"] >= 0 and "total_retrans" in ps  # TCP_INFO from our own sockets
        assert st["requests_ok"] == 3 and len(st["request_seconds_last"]) == 3
        rs = rx.stats()
        assert rs["bytes_landed"] == total and rs["sessions_ok"] == 3

        s = _samples(reg)
        assert s[(M.T_PEER_CONFIRMED.exposed, (("peer", peer),))] == total
        assert s[(M.T_PEER_IN_FLIGHT.exposed, (("peer", peer),))] == 0
        assert s[(M.T_SEND_REQUESTS.exposed, (("outcome", "ok"),))] == 3
        assert s[(M.T_RX_LANDED.exposed, ())] == total
        assert s[(M.T_RX_SESSIONS.exposed, (("outcome", "ok"),))] == 3
        assert (M.T_PEER_RTT.exposed, (("peer", peer),)) in s
    finally:
        tx.close()
        rx.close()


def test_failures_are_counted_by_type():
    rx, tx = pair(ReceiverConfig(announce_grace_s=0.1), SenderConfig(chunk_bytes=64 << 10, announce_wait_s=0))
    reg = CollectorRegistry()
    TransferCollector(sender=tx, registry=reg)
    try:
        items, _ = random_items(np.random.default_rng(0), {"L0": 10})
        sh = tx.open(rx.endpoint, manifest("nobody", items), token())
        sh.done.exception(timeout=10)
        assert _samples(reg)[(M.T_SEND_REQUESTS.exposed, (("outcome", "AuthError"),))] == 1
    finally:
        tx.close()
        rx.close()


def test_pacing_holds_the_budget():
    """0.2 Gbit/s = 25 MB/s: 5 MB cannot finish in under ~0.2 s minus one 1 MiB burst."""
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=64 << 10, connections=2, pacing_gbps=0.2))
    try:
        n = 5_000_000
        items, data = random_items(np.random.default_rng(1), {"L0": n})
        tok = token()
        rh = rx.expect("paced", tok, FP, ArraySink())
        t0 = time.monotonic()
        sh = tx.open(rx.endpoint, manifest("paced", items), tok)
        sh.send("L0", data["L0"])
        sh.done.result(timeout=20)
        elapsed = time.monotonic() - t0
        rh.done.result(timeout=5)
        assert elapsed >= (n - (1 << 20)) / 25e6 * 0.95, elapsed
    finally:
        tx.close()
        rx.close()


def test_earlier_request_is_not_starved_by_later_ones():
    """Chunks go to the oldest open request first, so a request that is nearly done finishes
    before newer ones that share the link."""
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=64 << 10, connections=1, pacing_gbps=0.1))
    try:
        rng = np.random.default_rng(2)
        a_items, a_data = random_items(rng, {"A": 1_500_000})
        handles = []
        ta = token()
        rx.expect("A", ta, FP, ArraySink())
        ha = tx.open(rx.endpoint, manifest("A", a_items), ta)
        ha.send("A", a_data["A"])
        deadline = time.monotonic() + 10
        while ha.progress()["bytes_sent"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        finished: list[str] = []
        ha.done.add_done_callback(lambda f: finished.append("A"))
        for r in range(3):
            b_items, b_data = random_items(rng, {"B": 200_000})
            tok = token()
            rx.expect(f"B{r}", tok, FP, ArraySink())
            hb = tx.open(rx.endpoint, manifest(f"B{r}", b_items), tok)
            hb.send("B", b_data["B"])
            hb.done.add_done_callback(lambda f, r=r: finished.append(f"B{r}"))
            handles.append(hb)
        ha.done.result(timeout=20)
        for h in handles:
            h.done.result(timeout=20)
        assert finished[0] == "A", finished
    finally:
        tx.close()
        rx.close()
