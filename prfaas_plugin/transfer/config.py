"""Typed configuration of the transfer engine, validated once at construction (the edge)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prfaas_plugin.transfer import wire

#: Striping unit. 1 MiB keeps a chunk inside L2 on both sides, so the checksum pass right after
#: ``recv_into``/before ``send`` reads hot cache lines; larger chunks gave no loopback gain.
DEFAULT_CHUNK_BYTES = 1 << 20
#: Most bytes one TCP data frame carries when a request has many chunks queued: consecutive
#: whole chunks of one item go out as one frame (one header, one checksum, one send). Per-frame
#: work (a GIL hand-off per syscall, locks, bookkeeping) cost about a fifth of loopback goodput
#: with 1 MiB frames on a 2-vCPU host; see bench/transfer.py. Striping is kept: a link takes at
#: most its fair share of the request's queued chunks.
DEFAULT_FRAME_BYTES = 16 << 20
#: Connections per peer; chosen by bench/transfer.py (case 2: 4 connections fill a 2 Gbit/s,
#: 20 ms link that one stock-buffered flow caps near 1.2 Gbit/s; loopback is flat from 1 to 4).
DEFAULT_CONNECTIONS = 4
#: Socket buffer sizes we *ask* for (the kernel clamps them to net.core.[rw]mem_max).
DEFAULT_SOCKET_BUFFER = 8 << 20


@dataclass(frozen=True)
class TlsConfig:
    """TLS for both the gRPC control session and the TCP data plane.

    On the receiver, ``cert_file``/``key_file`` are its identity and ``ca_file`` (with
    ``require_client_cert``) turns on mutual TLS. On the sender, ``ca_file`` verifies the
    receiver and ``cert_file``/``key_file`` are the client identity for mTLS."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    require_client_cert: bool = False
    #: Sender only: the name to verify in the receiver's certificate (default: the dialled host).
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TlsConfig: cert_file and key_file go together")
        if self.require_client_cert and not self.ca_file:
            raise ValueError("TlsConfig: require_client_cert needs ca_file to verify clients")


@dataclass(frozen=True)
class ReceiverConfig:
    """Decode-side listener settings."""

    listen: str = "127.0.0.1:0"
    #: Data-plane TCP port (0 = ephemeral); bound on the same host as ``listen``.
    data_port: int = 0
    #: Advertise this ``host:port`` for the data plane instead of the bound one (NAT, proxies).
    advertise_data: str | None = None
    #: Offer the raw TCP data plane; without it senders use the gRPC fallback.
    enable_tcp_data: bool = True
    receiver_id: str = ""
    tls: TlsConfig | None = None
    socket_buffer_bytes: int = DEFAULT_SOCKET_BUFFER
    #: gRPC worker threads: one is held per open session and per fallback data stream.
    max_workers: int = 128
    #: How long an Open may wait for the matching ``expect`` (router sends both at once).
    announce_grace_s: float = 5.0
    #: Largest chunk a sender may ask for (bounds a frame on the wire).
    max_chunk_bytes: int = 64 << 20
    #: Checksum failures tolerated per session before it fails with ChecksumError.
    max_checksum_failures: int = 8
    #: Per-chunk checksums accepted (the sender's first offer accepted here wins). None: by
    #: channel, ``wire.TLS_DEFAULT`` with TLS (``none`` accepted: AEAD already authenticates
    #: every byte), ``wire.PLAINTEXT_DEFAULT`` without (xxh3-64, crc32c, crc32).
    checksums: tuple[str, ...] | None = None
    #: Diagnostics only: let a plaintext data plane run without a per-chunk checksum.
    allow_unverified_plaintext: bool = False

    @property
    def effective_checksums(self) -> tuple[str, ...]:
        return _effective(self.checksums, self.tls is not None)

    def __post_init__(self) -> None:
        check_hostport(self.listen, "ReceiverConfig.listen")
        if self.advertise_data is not None:
            check_hostport(self.advertise_data, "ReceiverConfig.advertise_data")
        if not 0 <= self.data_port < 65536:
            raise ValueError(f"ReceiverConfig.data_port out of range: {self.data_port}")
        _check_checksums(self, "ReceiverConfig")
        if self.max_workers < 4:
            raise ValueError("ReceiverConfig.max_workers must be >= 4")
        if self.announce_grace_s < 0:
            raise ValueError("ReceiverConfig.announce_grace_s must be >= 0")


@dataclass(frozen=True)
class SenderConfig:
    """Prefill-side settings."""

    sender_id: str = ""
    #: Data connections per peer (striping width); reused across requests.
    connections: int = DEFAULT_CONNECTIONS
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Largest TCP data frame (whole chunks of one item); ``chunk_bytes`` = one chunk per frame.
    frame_bytes: int = DEFAULT_FRAME_BYTES
    #: "tcp" (falls back to gRPC if the receiver offers no TCP plane) or "grpc".
    data_plane: str = "tcp"
    #: Egress budget for all peers together; None = unpaced.
    pacing_gbps: float | None = None
    tls: TlsConfig | None = None
    socket_buffer_bytes: int = DEFAULT_SOCKET_BUFFER
    connect_timeout_s: float = 5.0
    #: How long (from ``open``) a sender keeps re-opening a session the receiver has not announced
    #: yet: a busy decode instance may schedule its half of the request after the prefill is done.
    #: Each try waits out the receiver's ``announce_grace_s``; the transfer deadline bounds it too.
    announce_wait_s: float = 30.0
    #: Resends of one chunk after receiver-side checksum failures before giving up.
    max_chunk_retries: int = 3
    #: A control channel to a receiver unused this long (no session open on it) is closed:
    #: decode instances come and go (rescheduled pods), and a long-running producer must not
    #: keep a channel, with its reconnect timers, to every address it ever sent to.
    channel_idle_s: float = 300.0
    #: Pinned staging pool for device tensors (bytes) and its slot size.
    staging_bytes: int = 64 << 20
    #: Per-chunk checksums offered, preferred first; ones this process lacks are skipped.
    #: None: by channel, as on the receiver (``none`` first with TLS, xxh3-64 first without).
    checksums: tuple[str, ...] | None = None
    #: Diagnostics only: let a plaintext data plane run without a per-chunk checksum.
    allow_unverified_plaintext: bool = False
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_checksums(self) -> tuple[str, ...]:
        return _effective(self.checksums, self.tls is not None)

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= 64:
            raise ValueError(f"SenderConfig.connections must be in 1..64, got {self.connections}")
        if not 4096 <= self.chunk_bytes <= (64 << 20):
            raise ValueError(f"SenderConfig.chunk_bytes must be in 4 KiB..64 MiB, got {self.chunk_bytes}")
        if not self.chunk_bytes <= self.frame_bytes <= (64 << 20):
            raise ValueError(f"SenderConfig.frame_bytes must be in chunk_bytes..64 MiB, got {self.frame_bytes}")
        if self.data_plane not in ("tcp", "grpc"):
            raise ValueError(f"SenderConfig.data_plane must be 'tcp' or 'grpc', got {self.data_plane!r}")
        if self.pacing_gbps is not None and self.pacing_gbps <= 0:
            raise ValueError("SenderConfig.pacing_gbps must be > 0 (or None)")
        _check_checksums(self, "SenderConfig")
        if self.announce_wait_s < 0:
            raise ValueError("SenderConfig.announce_wait_s must be >= 0")
        if self.staging_bytes < self.chunk_bytes:
            raise ValueError("SenderConfig.staging_bytes must hold at least one chunk")
        if not self.channel_idle_s > 0:
            raise ValueError(f"SenderConfig.channel_idle_s must be > 0, got {self.channel_idle_s}")


def _effective(names: Sequence[str] | None, tls: bool) -> tuple[str, ...]:
    """The checksums in force: those configured, else the channel's default."""
    if names is not None:
        return tuple(names)
    return wire.TLS_DEFAULT if tls else wire.PLAINTEXT_DEFAULT


def _check_checksums(cfg: ReceiverConfig | SenderConfig, what: str) -> None:
    check_integrity(cfg.checksums, cfg.tls is not None, cfg.allow_unverified_plaintext, f"{what}.checksums")


def check_integrity(names: Sequence[str] | None, tls: bool, allow_unverified_plaintext: bool, what: str) -> None:
    """Known names only, and no silent loss of corruption detection: a plaintext endpoint may
    offer or accept ``none`` only with ``allow_unverified_plaintext``. One rule for the engine's
    configs and the adapters' settings (``binding.ChannelSettings``); ``what`` names the checksums
    setting in the error."""
    if names is not None and (not names or any(n not in wire.KNOWN for n in names)):
        raise ValueError(f"{what} must be a non-empty subset of {sorted(wire.KNOWN)}, got {tuple(names)!r}")
    effective = _effective(names, tls)
    if not tls and "none" in effective and not allow_unverified_plaintext:
        raise ValueError(
            f"{what} {effective!r} allow 'none' on a plaintext data plane, where a corrupted KV "
            "byte would land unnoticed; configure TLS (which authenticates every byte), drop 'none', or set "
            "allow_unverified_plaintext (diagnostics only)"
        )
    if not wire.available(effective):
        raise ValueError(f"{what} {effective!r}: none is implemented in this process")


def check_hostport(value: str, what: str) -> None:
    """A ``host:port`` with a port in 0..65535 (0: any free port), else ValueError naming ``what``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} must be 'host:port', got {value!r}")


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    return host, int(port)
