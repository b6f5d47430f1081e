"""Shared helpers for the transfer tests: an in-memory sink, manifests with random data,
a receiver/sender pair on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np

from prfaas_plugin.transfer import (
    GrpcTcpReceiver,
    GrpcTcpSender,
    ItemSpec,
    LayoutFingerprint,
    ReceiverConfig,
    SenderConfig,
    TransferManifest,
)

FP = LayoutFingerprint({"model": "test", "dtype": "bfloat16", "block_size": 16, "tp_rank": 0, "tp_size": 1})


class ArraySink:
    """Destination buffers as numpy arrays (weakref-able, so leak tests can see them die)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.done_order: list[str] = []
        self.lock = threading.Lock()

    def buffer_for(self, item: ItemSpec) -> memoryview:
        arr = np.zeros(item.nbytes, dtype=np.uint8)
        self.arrays[item.name] = arr
        return memoryview(arr)

    def item_done(self, item: ItemSpec) -> None:
        with self.lock:
            self.done_order.append(item.name)


def random_items(rng: np.random.Generator, sizes: dict[str, int]) -> tuple[tuple[ItemSpec, ...], dict[str, np.ndarray]]:
    items = tuple(ItemSpec(n, s, order=i) for i, (n, s) in enumerate(sizes.items()))
    data = {n: rng.integers(0, 256, size=s, dtype=np.uint8) for n, s in sizes.items()}
    return items, data


def manifest(rid: str, items: tuple[ItemSpec, ...], fp: LayoutFingerprint = FP) -> TransferManifest:
    return TransferManifest(request_id=rid, items=items, fingerprint=fp, sender_id="test-prefill")


def token() -> str:
    return secrets.token_urlsafe(24)


def pair(
    rx: ReceiverConfig | None = None, tx: SenderConfig | None = None, **kw: Any
) -> tuple[GrpcTcpReceiver, GrpcTcpSender]:
    return GrpcTcpReceiver(rx or ReceiverConfig()), GrpcTcpSender(tx or SenderConfig(chunk_bytes=64 << 10), **kw)


class FrameProxy:
    """A man-in-the-middle for data connections that understands the framing, so tests can
    corrupt payload bytes, forge frames or cut a connection at a frame boundary.
    ``mutate(conn_no, frame_no, payload)`` returns the payload to forward, None to kill that
    connection, or a list of (header, payload) frames to forward instead (``self.header`` is
    the frame's own header meanwhile). ``self.lengths`` lists (conn_no, payload length)."""

    def __init__(self, mutate) -> None:
        import socket

        self.mutate = mutate
        self.upstream: tuple[str, int] | None = None
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.address = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.conns = 0
        self.frames = 0
        self.lengths: list[tuple[int, int]] = []
        self.header = b""
        self._stop = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self._lock:
                n = self.conns
                self.conns += 1
            threading.Thread(target=self._pipe, args=(c, n), daemon=True).start()

    def _pipe(self, c, conn_no: int) -> None:
        import socket

        from prfaas_plugin.transfer import wire

        assert self.upstream is not None
        up = socket.create_connection(self.upstream)

        def read(n: int) -> bytes:
            buf = bytearray(n)
            wire.recv_exact(c, memoryview(buf))
            return bytes(buf)

        try:
            up.sendall(read(len(wire.HELLO)))
            frame_no = 0
            while True:
                hbuf = bytearray(wire.HEADER64_SIZE)
                n, fields = wire.recv_header(c, hbuf)
                hdr, length = bytes(hbuf[:n]), fields[3]
                payload = read(length)
                with self._lock:
                    self.frames += 1
                    self.lengths.append((conn_no, length))
                    self.header = hdr
                    out = self.mutate(conn_no, frame_no, payload)
                frame_no += 1
                if out is None:
                    raise ConnectionError("cut by test")
                if isinstance(out, list):
                    for h, pl in out:
                        up.sendall(h + pl)
                else:
                    up.sendall(hdr + out)
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            for s in (c, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        import socket

        self._stop = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()


def proxied_pair(mutate, tx: SenderConfig | None = None, **rxkw: Any):
    from prfaas_plugin.transfer.config import split_hostport

    proxy = FrameProxy(mutate)
    rx = GrpcTcpReceiver(ReceiverConfig(advertise_data=proxy.address, **rxkw))
    proxy.upstream = split_hostport(rx.bound_data_endpoint)
    return proxy, rx, GrpcTcpSender(tx or SenderConfig(chunk_bytes=64 << 10, connections=2))


# ----------------------------------------------------------------------------------------------
# A test PKI: a CA, a rogue CA, a server certificate (localhost, 127.0.0.1), a client certificate
# from the CA and one from the rogue CA. Generated with ``cryptography`` at test time.
# ----------------------------------------------------------------------------------------------
def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, stem: str, cert, key) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    c, k = d / f"{stem}.crt", d / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(c), str(k)


def make_pki(d: Path) -> dict:
    """Paths (cert, key) by stem ("server", "client", "rogue-client", "ca.paths", "rogue-ca.paths")."""
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(d)
    out = {}
    for ca_name in ("ca", "rogue-ca"):
        k = ec.generate_private_key(ec.SECP256R1())
        out[ca_name] = (_cert(ca_name, k, _name(ca_name), k, ca=True), k)
        out[ca_name + ".paths"] = _write(d, ca_name, *out[ca_name])
    ca, ca_key = out["ca"]
    rogue, rogue_key = out["rogue-ca"]
    for stem, issuer, ikey, server in (
        ("server", ca, ca_key, True),
        ("client", ca, ca_key, False),
        ("rogue-client", rogue, rogue_key, False),
    ):
        k = ec.generate_private_key(ec.SECP256R1())
        out[stem] = _write(d, stem, _cert(stem, k, issuer.subject, ikey, ca=False, server=server), k)
    return out
