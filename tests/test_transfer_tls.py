"""TLS and mutual TLS on both planes; a client with a certificate from another CA is refused.
Certificates are generated at test time with ``cryptography``."""

from __future__ import annotations

import numpy as np
import pytest

cryptography = pytest.importorskip("cryptography")
from transfer_helpers import FP, ArraySink, make_pki, manifest, random_items, token

from prfaas_plugin.transfer import (
    AuthError,
    GrpcTcpReceiver,
    GrpcTcpSender,
    ReceiverConfig,
    SenderConfig,
    TlsConfig,
    TransferError,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _roundtrip(rx: GrpcTcpReceiver, tx: GrpcTcpSender, rid: str):
    items, data = random_items(np.random.default_rng(11), {"L0": 300_000, "L1": 1234})
    sink, tok = ArraySink(), token()
    rh = rx.expect(rid, tok, FP, sink, deadline_s=15)
    sh = tx.open(rx.endpoint, manifest(rid, items), tok, deadline_s=15)
    for it in items:
        sh.send(it.name, data[it.name])
    return sh, rh, sink, items, data


@pytest.mark.parametrize("plane", ["tcp", "grpc"])
def test_tls_round_trip(pki, plane):
    cert, key = pki["server"]
    rx = GrpcTcpReceiver(ReceiverConfig(tls=TlsConfig(cert_file=cert, key_file=key)))
    tx = GrpcTcpSender(
        SenderConfig(
            chunk_bytes=64 << 10,
            data_plane=plane,
            connections=2,
            tls=TlsConfig(ca_file=pki["ca.paths"][0], server_name="localhost"),
        )
    )
    try:
        sh, rh, sink, items, data = _roundtrip(rx, tx, f"tls-{plane}")
        sh.done.result(timeout=15)
        rh.done.result(timeout=15)
        for it in items:
            assert np.array_equal(sink.arrays[it.name], data[it.name])
    finally:
        tx.close()
        rx.close()


def _mtls_receiver(pki) -> GrpcTcpReceiver:
    cert, key = pki["server"]
    return GrpcTcpReceiver(
        ReceiverConfig(
            tls=TlsConfig(cert_file=cert, key_file=key, ca_file=pki["ca.paths"][0], require_client_cert=True)
        )
    )


def test_mtls_round_trip(pki):
    rx = _mtls_receiver(pki)
    ccert, ckey = pki["client"]
    tx = GrpcTcpSender(
        SenderConfig(
            chunk_bytes=64 << 10,
            tls=TlsConfig(cert_file=ccert, key_file=ckey, ca_file=pki["ca.paths"][0], server_name="localhost"),
        )
    )
    try:
        sh, rh, sink, items, data = _roundtrip(rx, tx, "mtls")
        sh.done.result(timeout=15)
        rh.done.result(timeout=15)
        assert np.array_equal(sink.arrays["L0"], data["L0"])
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("client", ["rogue-client", None])
def test_mtls_refuses_wrong_or_missing_client_cert(pki, client):
    rx = _mtls_receiver(pki)
    ccert, ckey = pki[client] if client else (None, None)
    tx = GrpcTcpSender(
        SenderConfig(
            chunk_bytes=64 << 10,
            connect_timeout_s=2,
            tls=TlsConfig(cert_file=ccert, key_file=ckey, ca_file=pki["ca.paths"][0], server_name="localhost"),
        )
    )
    try:
        sh, rh, sink, items, data = _roundtrip(rx, tx, f"bad-{client}")
        err = sh.done.exception(timeout=15)
        assert isinstance(err, AuthError), repr(err)
        assert rh.progress()["bytes_received"] == 0
        rh.abort("test over")
    finally:
        tx.close()
        rx.close()


def test_plaintext_client_cannot_talk_to_tls_receiver(pki):
    cert, key = pki["server"]
    rx = GrpcTcpReceiver(ReceiverConfig(tls=TlsConfig(cert_file=cert, key_file=key)))
    tx = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10))
    try:
        sh, rh, *_ = _roundtrip(rx, tx, "plain")
        assert isinstance(sh.done.exception(timeout=15), TransferError)
        assert rh.progress()["bytes_received"] == 0
        rh.abort("test over")
    finally:
        tx.close()
        rx.close()


def test_data_plane_refuses_rogue_client_cert(pki):
    """The raw TCP listener enforces the same mTLS policy as the gRPC control port."""
    import socket
    import ssl

    from prfaas_plugin.transfer import wire
    from prfaas_plugin.transfer.config import split_hostport
    from prfaas_plugin.transfer.tls import client_context

    rx = _mtls_receiver(pki)
    try:
        host, port = split_hostport(rx.bound_data_endpoint)
        ctx = client_context(
            TlsConfig(cert_file=pki["rogue-client"][0], key_file=pki["rogue-client"][1], ca_file=pki["ca.paths"][0])
        )
        with socket.create_connection((host, port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(wire.HELLO)
                    s.settimeout(5)
                    assert s.recv(1) == b""  # closed without serving us
            except (ssl.SSLError, ConnectionError):
                pass  # refused during or right after the handshake
        assert rx.stats()["data_connections"] == 0
    finally:
        rx.close()


def test_tls_session_negotiates_no_checksum_and_a_flipped_byte_is_caught(pki):
    """Under TLS no per-chunk checksum is used (AEAD authenticates every record); a bit flipped
    on the wire breaks that connection, and its unconfirmed chunks go again on a fresh one."""
    import threading

    from prfaas_plugin.faults.matrix import until
    from prfaas_plugin.faults.proxy import FaultKind, FaultPlan, FaultProxy
    from prfaas_plugin.transfer.config import split_hostport

    cert, key = pki["server"]
    proxy = FaultProxy(("127.0.0.1", 1))
    proxy.start()
    rx = GrpcTcpReceiver(ReceiverConfig(tls=TlsConfig(cert_file=cert, key_file=key), advertise_data=proxy.endpoint))
    proxy.upstream = split_hostport(rx.bound_data_endpoint or "")
    tx = GrpcTcpSender(
        SenderConfig(
            chunk_bytes=64 << 10, connections=2, tls=TlsConfig(ca_file=pki["ca.paths"][0], server_name="localhost")
        )
    )
    healed = threading.Event()

    def heal_after_first_flip() -> None:
        until(lambda: proxy.stats.corrupted_bytes > 0, 20.0, 0.001)
        proxy.set_fault(FaultPlan())
        healed.set()

    try:
        proxy.set_fault(FaultPlan(FaultKind.CORRUPT, after_bytes=100_000, corrupt_every=200_000))
        threading.Thread(target=heal_after_first_flip, daemon=True).start()
        items, data = random_items(np.random.default_rng(5), {"L0": 1 << 20, "L1": 1 << 20})
        sink, tok = ArraySink(), token()
        rh = rx.expect("tls-flip", tok, FP, sink, deadline_s=20)
        sh = tx.open(rx.endpoint, manifest("tls-flip", items), tok, deadline_s=20)
        for it in items:
            sh.send(it.name, data[it.name])
        sh.done.result(timeout=25)
        rh.done.result(timeout=25)
        assert healed.wait(5) and proxy.stats.corrupted_bytes >= 1
        assert rh.progress()["checksum"] == "none"
        for it in items:
            assert np.array_equal(sink.arrays[it.name], data[it.name])
        peers = tx.stats()["peers"].values()
        assert sum(p["chunks_resent"] for p in peers) >= 1
    finally:
        tx.close()
        rx.close()
        proxy.stop()


def test_tls_with_a_checksum_asked_for_still_works(pki):
    """A TLS receiver that insists on xxh3-64 (belt and braces) gets kind-2 frames over TLS."""
    cert, key = pki["server"]
    rx = GrpcTcpReceiver(ReceiverConfig(tls=TlsConfig(cert_file=cert, key_file=key), checksums=("xxh3-64",)))
    tx = GrpcTcpSender(
        SenderConfig(
            chunk_bytes=64 << 10, connections=2, tls=TlsConfig(ca_file=pki["ca.paths"][0], server_name="localhost")
        )
    )
    try:
        sh, rh, sink, items, data = _roundtrip(rx, tx, "tls-xxh3")
        sh.done.result(timeout=15)
        rh.done.result(timeout=15)
        assert rh.progress()["checksum"] == "xxh3-64"
        for it in items:
            assert np.array_equal(sink.arrays[it.name], data[it.name])
    finally:
        tx.close()
        rx.close()
