"""Every failure resolves both sides with the typed error, releases buffers, never hangs."""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from transfer_helpers import FP, ArraySink, manifest, pair, proxied_pair, random_items, token

from prfaas_plugin.transfer import (
    Aborted,
    AuthError,
    ChecksumError,
    FingerprintMismatch,
    ItemSpec,
    LayoutFingerprint,
    PeerGone,
    ProtocolError,
    ReceiverConfig,
    SenderConfig,
    TransferError,
    TransferTimeout,
    wire,
)

HERE = Path(__file__).parent


@pytest.fixture()
def engines():
    rx, tx = pair(ReceiverConfig(announce_grace_s=0.3), SenderConfig(chunk_bytes=64 << 10, announce_wait_s=1.0))
    yield rx, tx
    tx.close()
    rx.close()


def _err(fut, timeout=15.0):
    exc = fut.exception(timeout=timeout)
    assert exc is not None, "expected a failure"
    return exc


def test_fingerprint_mismatch_names_the_field(engines):
    rx, tx = engines
    items, data = random_items(np.random.default_rng(0), {"L0": 1000})
    tok = token()
    rh = rx.expect("fp", tok, FP, ArraySink())
    other = LayoutFingerprint({**FP.fields, "block_size": 128})
    sh = tx.open(rx.endpoint, manifest("fp", items, fp=other), tok)
    e1, e2 = _err(sh.done), _err(rh.done)
    assert isinstance(e1, FingerprintMismatch) and isinstance(e2, FingerprintMismatch)
    assert "block_size: 128 != 16" in str(e1)
    with pytest.raises(TransferError):
        sh.send("L0", data["L0"])


def test_bad_token_refused_both_sides(engines):
    rx, tx = engines
    items, _ = random_items(np.random.default_rng(0), {"L0": 1000})
    rh = rx.expect("tok", token(), FP, ArraySink())
    sh = tx.open(rx.endpoint, manifest("tok", items), token())
    assert isinstance(_err(sh.done), AuthError)
    assert isinstance(_err(rh.done), AuthError)
    assert rx.stats()["auth_refusals"] == 1


def test_unannounced_session_and_replay_refused(engines):
    rx, tx = engines
    items, data = random_items(np.random.default_rng(0), {"L0": 5000})
    tok = token()
    # never announced: refused once the sender's announce_wait_s (several receiver graces) ends
    assert isinstance(_err(tx.open(rx.endpoint, manifest("ghost", items), tok).done), AuthError)
    # a good session, then the same id and token again: single use, so the replay fails
    sink = ArraySink()
    rh = rx.expect("once", tok, FP, sink)
    sh = tx.open(rx.endpoint, manifest("once", items), tok)
    sh.send("L0", data["L0"])
    sh.done.result(timeout=15)
    rh.done.result(timeout=15)
    replay = tx.open(rx.endpoint, manifest("once", items), tok)
    assert isinstance(_err(replay.done), AuthError)


def test_abort_from_sender(engines):
    rx, tx = engines
    items, data = random_items(np.random.default_rng(0), {"L0": 10_000, "L1": 10_000})
    tok = token()
    rh = rx.expect("ab-s", tok, FP, ArraySink())
    sh = tx.open(rx.endpoint, manifest("ab-s", items), tok)
    sh.send("L0", data["L0"])
    _wait(lambda: rh.progress()["items_done"] == 1)
    sh.abort("prefill preempted")
    e_tx, e_rx = _err(sh.done), _err(rh.done)
    assert isinstance(e_tx, Aborted) and isinstance(e_rx, Aborted)
    assert "prefill preempted" in str(e_rx)
    with pytest.raises(Aborted):
        sh.send("L1", data["L1"])


def test_abort_from_receiver(engines):
    rx, tx = engines
    items, data = random_items(np.random.default_rng(0), {"L0": 10_000, "L1": 10_000})
    tok = token()
    rh = rx.expect("ab-r", tok, FP, ArraySink())
    sh = tx.open(rx.endpoint, manifest("ab-r", items), tok)
    sh.send("L0", data["L0"])
    _wait(lambda: rh.progress()["items_done"] == 1)
    rh.abort("decode request cancelled")
    e_tx, e_rx = _err(sh.done), _err(rh.done)
    assert isinstance(e_tx, Aborted) and isinstance(e_rx, Aborted)
    assert "decode request cancelled" in str(e_tx)


def test_stalled_sender_hits_deadline_and_buffers_are_released(engines):
    rx, tx = engines
    items, data = random_items(np.random.default_rng(0), {"L0": 10_000, "L1": 10_000})
    tok = token()
    sink = ArraySink()
    rh = rx.expect("stall", tok, FP, sink, deadline_s=1.0)
    sh = tx.open(rx.endpoint, manifest("stall", items), tok, deadline_s=30)
    sh.send("L0", data["L0"])  # L1 never comes
    t0 = time.monotonic()
    assert isinstance(_err(rh.done), TransferTimeout)
    assert isinstance(_err(sh.done), TransferTimeout)
    assert time.monotonic() - t0 < 5
    refs = [weakref.ref(a) for a in sink.arrays.values()]
    sink.arrays.clear()
    gc.collect()
    assert all(r() is None for r in refs), "receiver kept a sink buffer after failing"


def test_stalled_receiver_hits_sender_deadline(engines):
    rx, tx = engines
    gate = threading.Event()

    class SlowSink(ArraySink):
        def item_done(self, item):
            gate.wait(10)

    items, data = random_items(np.random.default_rng(0), {"L0": 10_000})
    tok = token()
    rh = rx.expect("slow", tok, FP, SlowSink(), deadline_s=30)
    sh = tx.open(rx.endpoint, manifest("slow", items), tok, deadline_s=1.0)
    sh.send("L0", data["L0"])
    try:
        assert isinstance(_err(sh.done), TransferTimeout)
        # Still stalled: the sender's cancelled session must fail the receiver's side too. (Were
        # the sink released first, it could finish the item before gRPC delivers the cancel.)
        assert isinstance(_err(rh.done), (PeerGone, TransferTimeout, Aborted))
    finally:
        gate.set()


def test_sink_refusal_is_a_protocol_error(engines):
    rx, tx = engines

    class PickySink(ArraySink):
        def buffer_for(self, item):
            raise ValueError(f"no slot for {item.name}")

    items, _ = random_items(np.random.default_rng(0), {"L0": 100})
    tok = token()
    rh = rx.expect("picky", tok, FP, PickySink())
    sh = tx.open(rx.endpoint, manifest("picky", items), tok)
    e = _err(sh.done)
    assert isinstance(e, ProtocolError) and "no slot for L0" in str(e)
    assert isinstance(_err(rh.done), ProtocolError)


def test_bad_send_arguments(engines):
    rx, tx = engines
    items, data = random_items(np.random.default_rng(0), {"L0": 100})
    tok = token()
    rh = rx.expect("args", tok, FP, ArraySink())
    sh = tx.open(rx.endpoint, manifest("args", items), tok)
    with pytest.raises(ProtocolError):
        sh.send("nope", data["L0"])
    with pytest.raises(ValueError):
        sh.send("L0", np.zeros(99, np.uint8))
    with pytest.raises(ValueError):
        sh.send("L0", np.zeros((20, 10), np.uint8)[:, :5])  # 100 bytes but not contiguous
    sh.send("L0", data["L0"])
    with pytest.raises(ValueError):
        sh.send("L0", data["L0"])
    sh.done.result(timeout=15)
    rh.done.result(timeout=15)
    with pytest.raises(ValueError):
        rx.expect("x", "short", FP, ArraySink())


def test_corrupted_chunk_is_resent_and_lands_exact():
    hit = {"done": False}

    def corrupt_once(conn, frame, payload):
        if not hit["done"] and len(payload) > 10:
            hit["done"] = True
            b = bytearray(payload)
            b[7] ^= 0x40
            return bytes(b)
        return payload

    proxy, rx, tx = proxied_pair(corrupt_once)
    try:
        items, data = random_items(np.random.default_rng(3), {"L0": 300_000, "L1": 300_000})
        sink, tok = ArraySink(), token()
        rh = rx.expect("crc1", tok, FP, sink)
        sh = tx.open(rx.endpoint, manifest("crc1", items), tok)
        for it in items:
            sh.send(it.name, data[it.name])
        sh.done.result(timeout=15)
        rh.done.result(timeout=15)
        for it in items:
            assert np.array_equal(sink.arrays[it.name], data[it.name])
        assert rx.stats()["checksum_failures"] == 1
        assert sum(p["chunks_resent"] for p in tx.stats()["peers"].values()) >= 1
    finally:
        tx.close()
        rx.close()
        proxy.close()


def test_persistent_corruption_fails_with_checksum_error():
    def corrupt_all(conn, frame, payload):
        return bytes([payload[0] ^ 1]) + payload[1:] if payload else payload

    proxy, rx, tx = proxied_pair(corrupt_all)
    try:
        items, data = random_items(np.random.default_rng(4), {"L0": 200_000})
        tok = token()
        rh = rx.expect("crc2", tok, FP, ArraySink())
        sh = tx.open(rx.endpoint, manifest("crc2", items), tok)
        sh.send("L0", data["L0"])
        assert isinstance(_err(sh.done), ChecksumError)
        assert isinstance(_err(rh.done), ChecksumError)
    finally:
        tx.close()
        rx.close()
        proxy.close()


def test_connection_cut_mid_request_chunks_resent_on_others():
    seen = {"n": 0, "cut": False}
    lock = threading.Lock()

    def cut_first_conn(conn, frame, payload):
        with lock:  # cut whichever connection carries the third frame overall
            seen["n"] += 1
            if seen["n"] == 3:
                seen["cut"] = True
                return None
        return payload

    proxy, rx, tx = proxied_pair(cut_first_conn, tx=SenderConfig(chunk_bytes=64 << 10, connections=3))
    try:
        items, data = random_items(np.random.default_rng(5), {f"L{i}": 256_000 for i in range(4)})
        sink, tok = ArraySink(), token()
        rh = rx.expect("cut", tok, FP, sink)
        sh = tx.open(rx.endpoint, manifest("cut", items), tok)
        for it in items:
            sh.send(it.name, data[it.name])
        sh.done.result(timeout=15)
        rh.done.result(timeout=15)
        for it in items:
            assert np.array_equal(sink.arrays[it.name], data[it.name])
        assert seen["cut"]
        peer = next(iter(tx.stats()["peers"].values()))
        assert peer["connection_failures"] >= 1
        _wait(lambda: proxy.conns > 3, timeout=5)  # the cut link reconnects for later requests
    finally:
        tx.close()
        rx.close()
        proxy.close()


def _spawn(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    return subprocess.Popen(
        [sys.executable, str(HERE / "transfer_peer.py"), *args], env=env, stdout=subprocess.PIPE, text=True
    )


def test_receiver_process_killed_mid_stream():
    tok = token()
    proc = _spawn("receiver", "killrx", tok)
    try:
        endpoint = proc.stdout.readline().strip()
        from prfaas_plugin.transfer import GrpcTcpSender

        tx = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10, connections=2, pacing_gbps=0.1))
        n = 8 << 20
        sh = tx.open(endpoint, manifest("killrx", (ItemSpec("big", n),)), tok, deadline_s=30)
        sh.send("big", np.ones(n, np.uint8))
        _wait(lambda: sh.progress()["bytes_sent"] > (1 << 20))
        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert isinstance(_err(sh.done), PeerGone)
        assert time.monotonic() - t0 < 10
        tx.close()
    finally:
        proc.kill()
        proc.wait()


def test_sender_process_killed_mid_stream(engines):
    rx, _ = engines
    tok = token()
    rh = rx.expect("killtx", tok, FP, ArraySink(), deadline_s=30)
    proc = _spawn("sender", rx.endpoint, "killtx", tok, str(8 << 20))
    try:
        _wait(lambda: rh.progress()["bytes_received"] > (1 << 20))
        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert isinstance(_err(rh.done), PeerGone)
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


def _wait(pred, timeout=15.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# -- Failures that used to end only at the deadline -------------------------------------------------
class _Listener:
    """A loopback listening socket whose accepted connections each get a thread (``_conn``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        raise NotImplementedError


class _HalfOpenProxy(_Listener):
    """Data-plane proxy that cuts the first frame it sees half-way: the sender's side is reset
    (the sender requeues and resends that frame on another link) while the receiver's side stays
    open for ``hold_s`` (a half-open path), so the resent copy arrives while the first copy is
    still arriving, and is drained as a duplicate; then the receiver's side closes."""

    def __init__(self, hold_s: float = 2.0) -> None:
        self.hold_s = hold_s
        self.upstream: tuple[str, int] | None = None
        self.first = True
        self.stalled = threading.Event()
        super().__init__()

    def _conn(self, c: socket.socket) -> None:
        assert self.upstream is not None
        up = socket.create_connection(self.upstream)
        try:
            hello = bytearray(len(wire.HELLO))
            wire.recv_exact(c, memoryview(hello))
            up.sendall(hello)
            while True:
                hbuf = bytearray(wire.HEADER64_SIZE)
                n, fields = wire.recv_header(c, hbuf)
                payload = bytearray(fields[3])
                wire.recv_exact(c, memoryview(payload))
                with self.lock:
                    first, self.first = self.first, False
                if not first:
                    up.sendall(bytes(hbuf[:n]) + bytes(payload))
                    continue
                up.sendall(bytes(hbuf[:n]) + bytes(payload[: len(payload) // 2]))
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                self.stalled.set()
                time.sleep(self.hold_s)
                return
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            for s in (c, up):
                try:
                    s.close()
                except OSError:
                    pass


def test_a_chunk_whose_resent_copy_was_drained_is_asked_for_again_when_the_first_copy_is_lost():
    from prfaas_plugin.transfer import GrpcTcpReceiver, GrpcTcpSender
    from prfaas_plugin.transfer.config import split_hostport

    chunk = 64 << 10
    proxy = _HalfOpenProxy()
    rx = GrpcTcpReceiver(ReceiverConfig(advertise_data=proxy.address))
    proxy.upstream = split_hostport(rx.bound_data_endpoint)
    tx = GrpcTcpSender(SenderConfig(chunk_bytes=chunk, frame_bytes=chunk, connections=2))
    try:
        items, data = random_items(np.random.default_rng(1), {"L0": 8 * chunk})
        sink, tok = ArraySink(), token()
        rh = rx.expect("halfopen", tok, FP, sink, deadline_s=12)
        sh = tx.open(rx.endpoint, manifest("halfopen", items), tok, deadline_s=12)
        sh.send("L0", data["L0"])
        assert proxy.stalled.wait(5)
        rh.done.result(timeout=proxy.hold_s + 5)  # it used to wait for the deadline
        sh.done.result(timeout=5)
        assert np.array_equal(sink.arrays["L0"], data["L0"])
        assert rx.stats()["duplicate_chunks"] >= 1  # the case really happened
    finally:
        tx.close()
        rx.close()
        proxy.lsock.close()


def test_a_sender_giving_up_while_the_receiver_opens_frees_the_receiver_session(engines):
    rx, tx = engines

    class SlowSink(ArraySink):  # allocating or pinning the buffers takes a while
        def buffer_for(self, item):
            time.sleep(1.0)
            return super().buffer_for(item)

    tok = token()
    rh = rx.expect("cxl", tok, FP, SlowSink(), deadline_s=10)
    sh = tx.open(rx.endpoint, manifest("cxl", (ItemSpec("L0", 1 << 20, 0),)), tok, deadline_s=10)
    time.sleep(0.4)  # the receiver is inside buffer_for now
    sh.abort("prefill gave up")
    assert isinstance(rh.done.exception(timeout=4), PeerGone)


def test_a_sink_failing_with_any_error_fails_the_receiver_session_at_once(engines):
    rx, tx = engines

    class OomSink(ArraySink):
        def buffer_for(self, item):
            raise RuntimeError("CUDA out of memory (simulated)")

    tok = token()
    rh = rx.expect("oom", tok, FP, OomSink(), deadline_s=10)
    sh = tx.open(rx.endpoint, manifest("oom", (ItemSpec("L0", 1 << 20, 0),)), tok, deadline_s=10)
    assert isinstance(sh.done.exception(timeout=4), TransferError)
    exc = rh.done.exception(timeout=4)
    assert isinstance(exc, ProtocolError) and "out of memory" in str(exc)


def test_a_staging_error_fails_the_request_not_the_link():
    from prfaas_plugin.transfer.staging import PooledStager, StagingPool

    class Dev:  # a device buffer stand-in: the stager is the component under test's neighbour
        def __init__(self, arr):
            self.arr = arr

    chunk = 64 << 10
    pool = StagingPool(4 * (32 << 10), 32 << 10, lambda n: np.empty(n, np.uint8))  # slots smaller than a chunk
    stager = PooledStager(
        pool,
        lambda d, s, o, n: np.copyto(d[:n], s.arr[o : o + n]),
        lambda o: isinstance(o, Dev),
        lambda o: o.arr.nbytes,
    )
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=chunk, connections=2), stager=stager)
    try:
        tok = token()
        rx.expect("stg", tok, FP, ArraySink(), deadline_s=10)
        sh = tx.open(rx.endpoint, manifest("stg", (ItemSpec("L0", 4 * chunk, 0),)), tok, deadline_s=10)
        sh.send("L0", Dev(np.zeros(4 * chunk, np.uint8)))
        exc = sh.done.exception(timeout=4)  # it used to retry on reconnected links until the deadline
        assert isinstance(exc, ProtocolError) and "cannot read item 0" in str(exc)
        assert all(p["connection_failures"] == 0 for p in tx.stats()["peers"].values())
    finally:
        tx.close()
        rx.close()


class _KillableProxy(_Listener):
    """A TCP proxy whose busiest connection (the gRPC data stream) can be reset on demand."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.conns: dict[socket.socket, list] = {}  # client side -> [bytes up, upstream side]
        super().__init__()
        self.endpoint = self.address

    def _conn(self, c: socket.socket) -> None:
        u = socket.create_connection(self.upstream)
        with self.lock:
            self.conns[c] = [0, u]
        threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
        self._pump(u, c, False)

    def _pump(self, a: socket.socket, b: socket.socket, up: bool) -> None:
        try:
            while d := a.recv(1 << 16):
                b.sendall(d)
                if up:
                    with self.lock:
                        if a in self.conns:
                            self.conns[a][0] += len(d)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def kill_busiest(self) -> None:
        with self.lock:
            c = max(self.conns, key=lambda k: self.conns[k][0])
            _, u = self.conns.pop(c)
        for s in (c, u):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def test_grpc_data_links_survive_blips_spread_over_their_life():
    """Three requests, each losing its data stream once and recovering: the link's failure count
    starts again once a new stream carries data (it used to add up over the link's life, and
    the third blip killed the link and failed its request)."""
    from prfaas_plugin.transfer import GrpcTcpReceiver, GrpcTcpSender
    from prfaas_plugin.transfer.config import split_hostport

    rx = GrpcTcpReceiver(ReceiverConfig(enable_tcp_data=False))
    proxy = _KillableProxy(split_hostport(rx.endpoint))
    tx = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10, connections=1, data_plane="grpc", pacing_gbps=0.05))
    try:
        for n in range(3):
            items, data = random_items(np.random.default_rng(n), {f"L{i}": 256 << 10 for i in range(16)})
            sink, tok = ArraySink(), token()
            rh = rx.expect(f"blip{n}", tok, FP, sink, deadline_s=15)
            sh = tx.open(proxy.endpoint, manifest(f"blip{n}", items), tok, deadline_s=15)
            for it in items:
                sh.send(it.name, data[it.name])
            _wait(lambda rh=rh: rh.progress()["bytes_received"] >= (1 << 20) or rh.done.done())
            proxy.kill_busiest()
            sh.done.result(timeout=20)
            rh.done.result(timeout=5)
            for it in items:
                assert np.array_equal(sink.arrays[it.name], data[it.name])
    finally:
        tx.close()
        rx.close()
        proxy.lsock.close()


def test_a_control_channel_left_idle_is_closed_and_comes_back_when_needed():
    """Decode instances come and go: a channel to one no longer sent to is closed after
    ``channel_idle_s``, not kept for the producer's life; sending there again opens a new one."""
    from prfaas_plugin.transfer import GrpcTcpReceiver, GrpcTcpSender

    rx_a, rx_b = GrpcTcpReceiver(ReceiverConfig()), GrpcTcpReceiver(ReceiverConfig())
    tx = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10, connections=1, channel_idle_s=0.2))

    def one(rx, rid):
        items, data = random_items(np.random.default_rng(0), {"L0": 256 << 10})
        sink, tok = ArraySink(), token()
        rh = rx.expect(rid, tok, FP, sink)
        sh = tx.open(rx.endpoint, manifest(rid, items), tok)
        sh.send("L0", data["L0"])
        sh.done.result(timeout=10)
        rh.done.result(timeout=10)
        assert np.array_equal(sink.arrays["L0"], data["L0"])

    with pytest.raises(ValueError, match="channel_idle_s"):
        SenderConfig(channel_idle_s=0)
    try:
        one(rx_a, "a1")
        assert tx.stats()["control_channels"] == 1
        time.sleep(0.3)
        one(rx_b, "b1")  # a's channel has been idle past channel_idle_s
        assert tx.stats()["control_channels"] == 1
        one(rx_a, "a2")  # and comes back on demand
        assert tx.stats()["control_channels"] == 2  # b's is still fresh
    finally:
        tx.close()
        rx_a.close()
        rx_b.close()
