"""The fault proxy itself: each fault does what it says to a real TCP stream."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest

from prfaas_plugin.faults import FaultKind, FaultPlan, FaultProxy


class _Sink:
    """Upstream server: reads everything, answers with the sha256 of what it got."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        chunks = []
        try:
            while True:
                b = conn.recv(1 << 20)
                if not b:
                    break
                chunks.append(b)
            data = b"".join(chunks)
            self.received.append(data)
            conn.sendall(hashlib.sha256(data).digest())
        except OSError:
            self.received.append(b"".join(chunks))
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink():
    s = _Sink()
    yield s
    s.close()


def _send(endpoint: tuple[str, int], payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(endpoint, timeout=timeout) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while len(out) < 32:
            b = c.recv(64)
            if not b:
                break
            out += b
        return out


def test_passthrough_is_byte_exact(sink) -> None:
    payload = bytes(range(256)) * 40_000
    with FaultProxy(sink.address) as proxy:
        assert _send(proxy.address, payload) == hashlib.sha256(payload).digest()
        assert proxy.stats.bytes_up == len(payload)


def test_reset_after_bytes_cuts_the_stream(sink) -> None:
    payload = b"x" * (4 << 20)
    with FaultProxy(sink.address) as proxy:
        proxy.set_fault(FaultPlan(FaultKind.RESET, after_bytes=1 << 20))
        with pytest.raises(OSError):
            with socket.create_connection(proxy.address, timeout=10) as c:
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                if not c.recv(64):
                    raise ConnectionResetError("closed without an answer")
        assert proxy.stats.resets == 1
        assert proxy.stats.bytes_up == 1 << 20
    deadline = time.monotonic() + 5
    while not sink.received and time.monotonic() < deadline:
        time.sleep(0.05)
    # The proxy passed exactly after_bytes on; an RST may drop part of that in flight, never more.
    assert sink.received and len(sink.received[0]) <= 1 << 20


def test_a_shared_budget_covers_connections_opened_later_and_once_heals(sink) -> None:
    """per_connection=False: the budget counts all connections from the moment the plan is set,
    so a reconnecting sender gets no fresh allowance; once=True resets every open connection a
    single time and then forwards again (a middlebox restart)."""
    with FaultProxy(sink.address) as proxy:
        first = socket.create_connection(proxy.address, timeout=10)
        first.sendall(b"a" * 1000)
        time.sleep(0.2)
        proxy.set_fault(FaultPlan(FaultKind.BLACKHOLE, after_bytes=500, per_connection=False))
        first.sendall(b"b" * 1000)
        late = socket.create_connection(proxy.address, timeout=10)
        late.sendall(b"c" * 1000)
        time.sleep(0.3)
        assert proxy.stats.bytes_up <= 1000 + 500 + 256 * 1024  # the late connection got no budget of its own
        before = proxy.stats.bytes_up
        time.sleep(0.2)
        assert proxy.stats.bytes_up == before  # stalled
        proxy.set_fault(FaultPlan(FaultKind.RESET, after_bytes=0, per_connection=False, once=True))
        deadline = time.monotonic() + 5
        while proxy.stats.resets < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.stats.resets == 2 and proxy.plan.kind is FaultKind.NONE
        first.close()
        late.close()
        payload = b"after the restart" * 1000
        assert _send(proxy.address, payload) == hashlib.sha256(payload).digest()


def test_a_fault_armed_while_a_connection_waits_applies_to_its_next_bytes(sink) -> None:
    """A connection idle in a read when the plan changes (a sender's pooled data connection
    between transfers) must not carry its next burst past the new fault unthrottled."""
    with FaultProxy(sink.address) as proxy:
        c = socket.create_connection(proxy.address, timeout=10)
        c.sendall(b"warm")
        time.sleep(0.2)  # the pump now waits in a read armed with no fault
        rate = 200_000
        proxy.set_fault(FaultPlan(FaultKind.THROTTLE, after_bytes=1000, rate_bytes_per_s=rate, per_connection=False))
        t0 = time.monotonic()
        c.sendall(b"x" * 101_000)
        deadline = time.monotonic() + 10
        while proxy.stats.bytes_up < 4 + 1000 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proxy.stats.bytes_up >= 4 + 1000, "the bytes before the fault's start must pass"
        while proxy.stats.bytes_up < 4 + 101_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        took = time.monotonic() - t0
        c.close()
    assert took >= 0.8 * 100_000 / rate, f"100 kB past the fault's start passed in {took:.2f} s: not throttled"


def test_corrupt_flips_bits_at_the_asked_spacing(sink) -> None:
    payload = bytes(1 << 20)
    with FaultProxy(sink.address) as proxy:
        proxy.set_fault(FaultPlan(FaultKind.CORRUPT, corrupt_every=4096))
        digest = _send(proxy.address, payload)
    assert digest != hashlib.sha256(payload).digest()
    got = sink.received[0]
    flipped = [i for i, b in enumerate(got) if b]
    assert flipped == list(range(4095, len(payload), 4096))


def test_blackhole_stalls_without_closing(sink) -> None:
    with FaultProxy(sink.address) as proxy:
        proxy.set_fault(FaultPlan(FaultKind.BLACKHOLE, after_bytes=1000))
        with socket.create_connection(proxy.address, timeout=0.5) as c:
            c.sendall(b"y" * 5000)
            c.shutdown(socket.SHUT_WR)
            with pytest.raises(socket.timeout):
                c.recv(64)
        assert proxy.stats.bytes_up == 1000


def test_throttle_limits_the_rate(sink) -> None:
    payload = b"z" * (512 * 1024)
    with FaultProxy(sink.address) as proxy:
        proxy.set_fault(FaultPlan(FaultKind.THROTTLE, rate_bytes_per_s=1 << 20))
        t0 = time.monotonic()
        assert _send(proxy.address, payload) == hashlib.sha256(payload).digest()
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.4  # 512 KiB at 1 MiB/s


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_bytes_per_s"):
        FaultPlan(FaultKind.THROTTLE)
    with pytest.raises(ValueError, match="after_bytes"):
        FaultPlan(FaultKind.RESET, after_bytes=-1)
