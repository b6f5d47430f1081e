"""TLS material for both planes: gRPC credentials for the control session, ssl contexts for
the raw TCP data connections. Same files, same policy on both planes."""

from __future__ import annotations

import ssl

import grpc

from prfaas_plugin.transfer.config import TlsConfig


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read(path: str | None) -> bytes | None:
    return None if path is None else _read_file(path)


def grpc_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("receiver TLS needs cert_file and key_file")
    return grpc.ssl_server_credentials(
        [(_read_file(tls.key_file), _read_file(tls.cert_file))],
        root_certificates=_read(tls.ca_file) if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert,
    )


def grpc_channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file and tls.key_file
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=tls.ca_file)
    return ctx


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    else:
        ctx.load_default_certs()
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def probe_refusal(endpoint: str, tls: TlsConfig, timeout: float = 2.0) -> str | None:
    """Why a TLS peer refuses us, or None if the handshake works.

    gRPC only reports "Socket closed" when the server rejects our certificate, which reads like
    a dead peer. This dials once more with Python's ssl to get the real alert (with TLS 1.3 it
    arrives on the first read after the handshake), so a wrong certificate surfaces as an
    AuthError rather than a retryable PeerGone."""
    import socket

    from prfaas_plugin.transfer.config import split_hostport

    host, port = split_hostport(endpoint)
    ctx = client_context(tls)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=tls.server_name or host) as s:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                s.settimeout(timeout)
                if s.recv(1) == b"":
                    # A healthy gRPC server answers the preface with SETTINGS; closing right
                    # after a TLS 1.3 handshake is how it rejects a client certificate.
                    return "server closed the connection after the handshake (client certificate not accepted)"
    except ssl.SSLError as e:
        return f"{e.reason or e}"
    except (OSError, ValueError):
        return None
    return None
