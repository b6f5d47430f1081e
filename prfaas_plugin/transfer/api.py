"""The transfer engine's public contract, shared by every engine adapter.

Engine adapters (the vLLM connector, the SGLang backend) code against these types only; the
implementation behind them (gRPC control session, multi-connection TCP data plane) can change
without touching an adapter.

The model is *push*: the prefill side (sender) streams a request's KV to a receiver that the
decode side runs. A request's KV is described as a list of named items (a layer's packed pages,
a recurrent state, a sliding-window tail...). The sender may send an item as soon as it exists,
so layers cross the wire while later layers are still being computed.

Ownership rules, which the connector relies on for block lifetime:
- ``SendHandle.send`` does not copy: the source buffer must stay valid until ``done`` resolves
  (the vLLM producer keeps its blocks with ``delay_free`` until then).
- ``done`` on the sender resolves only after the receiver confirmed every byte landed and
  passed its checksum, so freeing source blocks then is safe.
- Every failure resolves ``done`` (both sides) with a ``TransferError`` subclass; nothing hangs.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol


# ----------------------------------------------------------------------------------------------
# Errors: typed so adapters can map them to engine policy (recompute locally, fail the request).
# ----------------------------------------------------------------------------------------------
class TransferError(Exception):
    """Base of every error the transfer engine reports for a request."""

    retryable: bool = False


class FingerprintMismatch(TransferError):
    """Sender and receiver lay out the cache differently (model, dtype, block size, TP...)."""


class AuthError(TransferError):
    """Unknown session, wrong or replayed token, or a TLS identity that is not allowed."""


class ChecksumError(TransferError):
    """A chunk's bytes did not match its checksum."""

    retryable = True


class PeerGone(TransferError):
    """The peer reset or closed every connection of the session."""

    retryable = True


class TransferTimeout(TransferError):
    """A deadline passed (session open, stall with no progress, or the whole transfer)."""

    retryable = True


class Aborted(TransferError):
    """Either side aborted the session on purpose."""


class ProtocolError(TransferError):
    """The peer sent something that the protocol does not allow (size overrun, bad frame...)."""


# ----------------------------------------------------------------------------------------------
# Descriptions of what crosses the wire.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutFingerprint:
    """What both sides must agree on before bytes move: layer kinds, shapes, dtypes, block size,
    tensor-parallel rank/size... Free-form fields so each engine adapter states its own layout;
    compared field by field so a mismatch message names what differs."""

    fields: Mapping[str, Any]

    def canonical(self) -> str:
        return json.dumps(self.fields, sort_keys=True, separators=(",", ":"), default=str)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:32]

    def diff(self, other: LayoutFingerprint) -> list[str]:
        """Human-readable differences, e.g. ``["block_size: 16 != 128"]``; empty if equal."""
        out: list[str] = []
        keys = sorted(set(self.fields) | set(other.fields))
        for k in keys:
            a, b = self.fields.get(k, "<missing>"), other.fields.get(k, "<missing>")
            if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
                out.append(f"{k}: {a!r} != {b!r}")
        return out


@dataclass(frozen=True)
class ItemSpec:
    """One named, contiguous byte range of a request's KV (e.g. ``"g3.L12"`` = group 3's packed
    pages for layer 12, ``"g0.state"`` = a recurrent state). ``order`` is the production order,
    used for scheduling priority (earlier layers first) and per-layer progress reports."""

    name: str
    nbytes: int
    order: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ItemSpec.name must be non-empty")
        if self.nbytes < 0:
            raise ValueError(f"ItemSpec {self.name!r}: nbytes must be >= 0, got {self.nbytes}")


@dataclass(frozen=True)
class TransferManifest:
    """Everything the receiver must know to accept a request's bytes."""

    request_id: str
    items: tuple[ItemSpec, ...]
    fingerprint: LayoutFingerprint
    sender_id: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [i.name for i in self.items]
        if len(set(names)) != len(names):
            raise ValueError(f"manifest {self.request_id!r} has duplicate item names")

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)


# ----------------------------------------------------------------------------------------------
# Receiver side (decode).
# ----------------------------------------------------------------------------------------------
class ReceiveSink(Protocol):
    """Supplied by the engine adapter: where each item's bytes go."""

    def buffer_for(self, item: ItemSpec) -> memoryview:
        """A writable, contiguous buffer of exactly ``item.nbytes`` for this item. Raise
        ``TransferError`` (or ``ValueError``) to refuse an item the adapter did not expect."""

    def item_done(self, item: ItemSpec) -> None:
        """Every byte of ``item`` has landed and passed its checksum (e.g. unpack this layer)."""

    # Optional: ``def skip_bytes(self, item: ItemSpec) -> int`` -- how many leading bytes of
    # ``item`` this side already holds (a decode instance whose prefix cache covers the first
    # blocks). The sender is told at Open and does not send them; the buffer's first
    # ``skip_bytes`` bytes are then left unwritten. Sinks without it receive every byte.


class ReceiveHandle(ABC):
    request_id: str
    #: Resolves with the manifest when every item landed; with a TransferError otherwise.
    done: Future[TransferManifest]

    @abstractmethod
    def abort(self, reason: str = "aborted by receiver") -> None: ...

    @abstractmethod
    def progress(self) -> Mapping[str, Any]:
        """Bytes received, items completed, elapsed seconds."""


class TransferReceiver(ABC):
    """Listens for sessions. Only sessions announced with ``expect`` are accepted."""

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """``host:port`` the sender dials (the gRPC control endpoint)."""

    @abstractmethod
    def expect(
        self,
        request_id: str,
        token: str,
        fingerprint: LayoutFingerprint,
        sink: ReceiveSink,
        deadline_s: float = 60.0,
    ) -> ReceiveHandle:
        """Announce a session. A sender that opens it must present ``token`` and a matching
        fingerprint; the whole transfer must finish within ``deadline_s``."""

    @abstractmethod
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# Sender side (prefill).
# ----------------------------------------------------------------------------------------------
class SendHandle(ABC):
    request_id: str
    #: Resolves when the receiver confirmed every item; with a TransferError otherwise.
    done: Future[None]

    @abstractmethod
    def send(self, name: str, data: Any) -> None:
        """Queue one item's bytes (bytes-like, numpy array or contiguous CPU torch tensor of
        exactly the manifest's size). Non-blocking and zero-copy: keep ``data`` alive until
        ``done`` resolves. Raises ``TransferError`` if the session already failed."""

    @abstractmethod
    def abort(self, reason: str = "aborted by sender") -> None: ...

    @abstractmethod
    def progress(self) -> Mapping[str, Any]: ...


class TransferSender(ABC):
    @abstractmethod
    def open(
        self,
        endpoint: str,
        manifest: TransferManifest,
        token: str,
        deadline_s: float = 60.0,
    ) -> SendHandle:
        """Open a session to the receiver at ``endpoint`` (non-blocking: failures to connect
        or refusals resolve ``done`` with the error)."""

    @abstractmethod
    def close(self) -> None: ...
