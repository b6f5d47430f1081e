"""Transfer telemetry for the router's bandwidth-aware loop: a Python snapshot API and a
Prometheus collector that reads the same snapshots (so the two never disagree)."""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def tcp_info(sock: socket.socket) -> dict[str, float] | None:
    """RTT (ms), RTT variance, congestion window and retransmit counters from Linux TCP_INFO;
    None where the platform does not expose it."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 232)
    except OSError:
        return None
    if len(raw) < 104:
        return None
    retransmits = raw[2]
    rtt_us, rttvar_us = struct.unpack_from("<II", raw, 68)
    snd_cwnd = struct.unpack_from("<I", raw, 80)[0]
    total_retrans = struct.unpack_from("<I", raw, 100)[0]
    return {
        "rtt_ms": rtt_us / 1000.0,
        "rttvar_ms": rttvar_us / 1000.0,
        "snd_cwnd": float(snd_cwnd),
        "retransmits": float(retransmits),
        "total_retrans": float(total_retrans),
    }


class RateMeter:
    """Goodput over a sliding window (default 2 s) of confirmed bytes."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, nbytes))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()

    def gbps(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._events)
        return total * 8 / self.window_s / 1e9


@dataclass
class PeerStats:
    """Counters for one peer (a receiver's data endpoint on the sender side)."""

    peer: str
    bytes_sent: int = 0
    bytes_confirmed: int = 0
    chunks_sent: int = 0
    chunks_resent: int = 0
    connection_failures: int = 0
    meter: RateMeter = field(default_factory=RateMeter)


class SenderTelemetry:
    """Thread-safe counters of a TransferSender; ``snapshot()`` is the Python API."""

    def __init__(self, keep_last: int = 256) -> None:
        self._lock = threading.Lock()
        self.peers: dict[str, PeerStats] = {}
        self.request_seconds: collections.deque[float] = collections.deque(maxlen=keep_last)
        self.requests_ok = 0
        self.requests_failed: collections.Counter[str] = collections.Counter()

    def peer(self, name: str) -> PeerStats:
        with self._lock:
            st = self.peers.get(name)
            if st is None:
                st = self.peers[name] = PeerStats(name)
            return st

    def sent(self, peer: str, nbytes: int, resend: bool) -> None:
        st = self.peer(peer)
        with self._lock:
            st.bytes_sent += nbytes
            st.chunks_sent += 1
            st.chunks_resent += int(resend)

    def confirmed(self, peer: str, nbytes: int) -> None:
        st = self.peer(peer)
        with self._lock:
            st.bytes_confirmed += nbytes
        st.meter.add(nbytes)

    def connection_failed(self, peer: str) -> None:
        st = self.peer(peer)
        with self._lock:
            st.connection_failures += 1

    def finished(self, seconds: float, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                self.requests_ok += 1
                self.request_seconds.append(seconds)
            else:
                self.requests_failed[type(error).__name__] += 1

    def snapshot(self, live: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        """``live`` adds per-peer gauges (queue depth, bytes in flight, TCP_INFO) that only the
        sender's peers know."""
        live_by_peer = {d["peer"]: d for d in live}
        with self._lock:
            peers = {}
            for name, st in self.peers.items():
                d = {
                    "bytes_sent": st.bytes_sent,
                    "bytes_confirmed": st.bytes_confirmed,
                    "chunks_sent": st.chunks_sent,
                    "chunks_resent": st.chunks_resent,
                    "connection_failures": st.connection_failures,
                    "goodput_gbps": st.meter.gbps(),
                }
                d.update({k: v for k, v in live_by_peer.get(name, {}).items() if k != "peer"})
                peers[name] = d
            times = sorted(self.request_seconds)
            return {
                "peers": peers,
                "requests_ok": self.requests_ok,
                "requests_failed": dict(self.requests_failed),
                "request_seconds_p50": times[len(times) // 2] if times else None,
                "request_seconds_max": times[-1] if times else None,
                "request_seconds_last": list(self.request_seconds)[-16:],
            }


class ReceiverTelemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_landed = 0
        self.chunks_landed = 0
        self.checksum_failures = 0
        self.duplicate_chunks = 0
        self.sessions_ok = 0
        self.sessions_failed: collections.Counter[str] = collections.Counter()
        self.auth_refusals = 0
        self.meter = RateMeter()

    def landed(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_landed += nbytes
            self.chunks_landed += 1
        self.meter.add(nbytes)

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def session_end(self, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                self.sessions_ok += 1
            else:
                self.sessions_failed[type(error).__name__] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "bytes_landed": self.bytes_landed,
                "chunks_landed": self.chunks_landed,
                "checksum_failures": self.checksum_failures,
                "duplicate_chunks": self.duplicate_chunks,
                "sessions_ok": self.sessions_ok,
                "sessions_failed": dict(self.sessions_failed),
                "auth_refusals": self.auth_refusals,
                "goodput_gbps": self.meter.gbps(),
            }
