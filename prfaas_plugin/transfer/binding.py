"""How an engine adapter binds to the transfer core: one home for what both adapters need.

Each adapter (vLLM connector, SGLang backend) keeps its own *meaning* of items and its own
configuration surface, but builds endpoints, names items and lands bytes the same way:

* :class:`ChannelSettings` (the adapters' TLS and per-chunk integrity keys and their rules) ->
  :class:`TlsOptions` (+ its file checks) + :class:`EndpointSpec` -> :class:`EngineTransport`:
  the sender and the per-rank receiver, with TLS/mTLS on both planes and the checksums they
  offer and accept. Adapters take a :data:`TransportFactory`
  so tests can inject another implementation of the contract (an in-process loopback fabric,
  a fault proxy) without touching the adapter.
* :func:`rank_port`: the one rule for ports per rank (``base + rank``; 0 stays "any free port").
* :class:`ItemNameCodec`: one encoder/decoder of dotted, self-describing item names.
* :class:`StagedSink`: a ``ReceiveSink`` that lands an item where the adapter says and, when
  that is a staging buffer rather than the destination itself, commits it once the item is
  complete.
"""

from __future__ import annotations

import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

from pydantic import BaseModel, field_validator, model_validator

from prfaas_plugin.transfer.api import ItemSpec, TransferReceiver, TransferSender
from prfaas_plugin.transfer.config import (
    DEFAULT_CONNECTIONS,
    ReceiverConfig,
    SenderConfig,
    TlsConfig,
    check_integrity,
)


# ----------------------------------------------------------------------------------------------
# Endpoints
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsOptions:
    """The TLS settings an adapter exposes (PEM paths), the same names and defaults in both.

    ``cert``/``key`` are this side's identity (the receiver's server certificate, the sender's
    client certificate for mTLS); ``ca`` verifies the peer; ``require_client_cert`` makes the
    receiver demand a client certificate signed by ``ca``. TLS is on when ``cert`` or ``ca`` is set.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def config(self, server: bool) -> TlsConfig | None:
        """The transfer engine's TLS config for one role; None when TLS is off."""
        if not self.enabled:
            return None
        return TlsConfig(
            cert_file=self.cert,
            key_file=self.key,
            ca_file=self.ca,
            require_client_cert=self.require_client_cert if server else False,
        )

    def check(self, server: bool) -> None:
        """Refuse, at startup and naming the option, TLS files that cannot serve: unreadable
        paths, a certificate and key that do not belong together, a CA that is not PEM, or a
        receiver (``server``) with TLS on but no certificate of its own. The settings models
        check what needs no files (:class:`ChannelSettings`); this runs where the files must exist."""
        if not self.enabled:
            return
        for opt, path in (("tls_cert", self.cert), ("tls_key", self.key), ("tls_ca", self.ca)):
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"{opt} {path!r} cannot be read: {e.strerror or e}") from None
        if server and not self.cert:
            raise ValueError("a receiver serving TLS needs tls_cert and tls_key (its server certificate)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.cert and self.key:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(
                    f"tls_cert {self.cert!r} and tls_key {self.key!r} are not a PEM certificate and its private key: {e}"
                ) from None
        if self.ca:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"tls_ca {self.ca!r} is not a PEM CA certificate bundle: {e}") from None


class ChannelSettings(BaseModel):
    """The channel keys of an adapter's settings (the vLLM connector's ``kv_connector_extra_config``,
    the SGLang backend's ``PRFAAS_SGLANG_*``): TLS and per-chunk integrity, one definition, so
    both adapters take the same names, defaults and rules. Adapters' settings models derive
    from it."""

    #: PEM paths of this side's identity: the receiver's server certificate, the sender's client
    #: certificate for mutual TLS. They go together.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM path of the CA that verifies the peer. TLS (both planes) is on when ``tls_cert`` or
    #: ``tls_ca`` is set; both sides must agree.
    tls_ca: str | None = None
    #: Receiver: require sender client certificates signed by ``tls_ca`` (mutual TLS).
    tls_require_client_cert: bool = False
    #: Per-chunk checksums, preferred first: what a sender offers and a receiver accepts (the
    #: sender's first offer the receiver accepts wins). None: by channel, ``none`` first under
    #: TLS (its AEAD already authenticates every byte), ``xxh3-64, crc32c, crc32`` on plaintext.
    #: A list, or one comma-separated string (an environment variable).
    checksums: tuple[str, ...] | None = None
    #: Diagnostics only: let a plaintext data plane run without a per-chunk checksum.
    allow_unverified_plaintext: bool = False

    @field_validator("checksums", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(n.strip() for n in v.split(",") if n.strip())
        return v

    @model_validator(mode="after")
    def _channel_rules(self) -> Self:
        for opt in ("tls_cert", "tls_key", "tls_ca"):
            if getattr(self, opt) == "":
                raise ValueError(f"{opt} must be a path, not empty (leave it out for no TLS)")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ValueError(f"tls_cert and tls_key go together ({missing} is missing)")
        if self.tls_require_client_cert and not self.tls_ca:
            raise ValueError("tls_require_client_cert needs tls_ca to verify the senders' certificates")
        check_integrity(self.checksums, self.tls_options().enabled, self.allow_unverified_plaintext, "checksums")
        return self

    def tls_options(self) -> TlsOptions:
        return TlsOptions(self.tls_cert, self.tls_key, self.tls_ca, self.tls_require_client_cert)


def rank_port(base: int, rank: int) -> int:
    """Port of rank ``rank`` when rank 0 uses ``base``; 0 (any free port) stays 0 for every rank."""
    if base < 0 or rank < 0:
        raise ValueError(f"port {base} / rank {rank} must be >= 0")
    if not base:
        return 0
    port = base + rank
    if port >= 65536:
        raise ValueError(f"port {base} + rank {rank} is past 65535")
    return port


def join_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(frozen=True)
class EndpointSpec:
    """Everything but the per-rank addresses that an adapter's transfer endpoints need."""

    sender_id: str
    receiver_id: str
    tls: TlsOptions = TlsOptions()
    #: Sender: data connections per receiver (None: the engine's default).
    connections: int | None = None
    #: Sender: egress budget in Gbit/s (None: unpaced).
    pacing_gbps: float | None = None
    #: Checksums offered (sender) and accepted (receiver); None: by channel (``ChannelSettings``).
    checksums: tuple[str, ...] | None = None
    allow_unverified_plaintext: bool = False


class Transport(Protocol):
    """Builds the endpoints of one rank: producers a sender, consumers a receiver."""

    def sender(self) -> TransferSender: ...

    def receiver(
        self, host: str, port: int, data_port: int = 0, advertise_data: str | None = None
    ) -> TransferReceiver: ...


class EngineTransport:
    """The prfaas transfer engine (gRPC control session, multi-connection TCP data plane)."""

    def __init__(self, spec: EndpointSpec) -> None:
        self.spec = spec

    def sender(self) -> TransferSender:
        from prfaas_plugin.transfer.sender import GrpcTcpSender

        s = self.spec
        return GrpcTcpSender(
            SenderConfig(
                sender_id=s.sender_id,
                connections=DEFAULT_CONNECTIONS if s.connections is None else s.connections,
                pacing_gbps=s.pacing_gbps,
                tls=s.tls.config(server=False),
                checksums=s.checksums,
                allow_unverified_plaintext=s.allow_unverified_plaintext,
            )
        )

    def receiver(self, host: str, port: int, data_port: int = 0, advertise_data: str | None = None) -> TransferReceiver:
        from prfaas_plugin.transfer.receiver import GrpcTcpReceiver

        return GrpcTcpReceiver(
            ReceiverConfig(
                listen=join_hostport(host, port),
                data_port=data_port,
                advertise_data=advertise_data,
                receiver_id=self.spec.receiver_id,
                tls=self.spec.tls.config(server=True),
                checksums=self.spec.checksums,
                allow_unverified_plaintext=self.spec.allow_unverified_plaintext,
            )
        )


#: What an adapter calls to get its transport from its own settings; tests swap it.
C = TypeVar("C")
TransportFactory = Callable[[C], Transport]


# ----------------------------------------------------------------------------------------------
# Item names
# ----------------------------------------------------------------------------------------------
class ItemNameError(ValueError):
    """An item name that does not follow the codec's format."""


@dataclass(frozen=True)
class ItemNameCodec:
    """Dotted item names: an optional ``head`` word, then one non-negative integer per label
    (written ``<label><n>``), then, with ``tail``, a free-form rest that may itself hold dots
    (a layer name). E.g. head ``"kv"``, labels ``("", "", "")`` -> ``kv.0.16.8``; no head,
    labels ``("g", "b")`` and a tail -> ``g0.b16.model.layers.0.attn``."""

    head: str
    labels: tuple[str, ...]
    tail: bool = False

    def encode(self, *values: int, tail: str = "") -> str:
        if len(values) != len(self.labels):
            raise ItemNameError(f"{len(values)} values for {len(self.labels)} fields of {self!r}")
        if any(v < 0 for v in values):
            raise ItemNameError(f"item name fields must be >= 0, got {values}")
        if bool(tail) != self.tail:
            raise ItemNameError("a tail is required" if self.tail else "this name has no tail")
        parts = ([self.head] if self.head else []) + [f"{lab}{v}" for lab, v in zip(self.labels, values)]
        return ".".join(parts + ([tail] if tail else []))

    def decode(self, name: str) -> tuple[tuple[int, ...], str]:
        """The integer fields and the tail (empty without one); ItemNameError if ``name`` is
        not of this format."""
        n = len(self.labels) + (1 if self.head else 0)
        parts = name.split(".", n) if self.tail else name.split(".")
        if len(parts) != n + (1 if self.tail else 0) or (self.tail and not parts[-1]):
            raise ItemNameError(f"unexpected item name {name!r}")
        if self.head:
            if parts[0] != self.head:
                raise ItemNameError(f"unexpected item name {name!r}")
            parts = parts[1:]
        values = []
        for lab, field in zip(self.labels, parts):
            digits = field[len(lab) :]
            if not field.startswith(lab) or not (digits.isascii() and digits.isdigit()):
                raise ItemNameError(f"unexpected item name {name!r}")
            values.append(int(digits))
        return tuple(values), parts[-1] if self.tail else ""

    def matches(self, name: str) -> bool:
        try:
            self.decode(name)
        except ItemNameError:
            return False
        return True


# ----------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------
S = TypeVar("S")


class StagedSink(ABC, Generic[S]):
    """A ``ReceiveSink`` for destinations that cannot always take bytes in place.

    ``land`` returns the buffer the item's bytes go into and, when that buffer is a staging
    copy, what ``commit`` needs to move it to its destination once every byte has landed (None
    when the bytes landed in place). Subclasses may add ``skip_bytes``."""

    def __init__(self) -> None:
        self._staged: dict[str, S] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def land(self, item: ItemSpec) -> tuple[memoryview, S | None]:
        """Validate ``item`` against the destination (raise ValueError to refuse it) and
        return where its ``item.nbytes`` bytes go."""

    @abstractmethod
    def commit(self, item: ItemSpec, staged: S) -> None:
        """Move a complete staged item to its destination."""

    def buffer_for(self, item: ItemSpec) -> memoryview:
        view, staged = self.land(item)
        if staged is not None:
            with self._lock:
                self._staged[item.name] = staged
        return view

    def item_done(self, item: ItemSpec) -> None:
        with self._lock:
            staged = self._staged.pop(item.name, None)
        if staged is not None:
            self.commit(item, staged)
