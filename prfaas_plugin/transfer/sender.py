"""Prefill side: per-request gRPC control sessions, per-peer striped data connections.

Scheduling: every peer (a receiver's data endpoint) has one ordered set of open requests and N
connections (links). Each link's thread takes the next chunk from the *oldest* request that has
one ready, so an earlier request (hence a nearly finished one) is never starved by later ones,
and one request's chunks stripe across all links. ``send`` only records a view of the caller's
memory, so sender memory stays bounded by the caller's own buffers (plus the staging pool for
device tensors); TCP flow control is the backpressure to the links, and the pacer holds the
sender's total egress under its budget."""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc

from prfaas_plugin.protocol.transfer import GRPC_SERVICE as SERVICE
from prfaas_plugin.protocol.transfer import TRANSFER_PROTOCOL_VERSION as PROTOCOL_VERSION
from prfaas_plugin.transfer import tls as tlsmod
from prfaas_plugin.transfer import wire
from prfaas_plugin.transfer._gen import transfer_pb2 as pb
from prfaas_plugin.transfer.affinity import use_transfer_cpus
from prfaas_plugin.transfer.api import (
    Aborted,
    AuthError,
    ChecksumError,
    PeerGone,
    ProtocolError,
    SendHandle,
    TransferError,
    TransferManifest,
    TransferSender,
)
from prfaas_plugin.transfer.buffers import byte_view, is_device_tensor
from prfaas_plugin.transfer.config import SenderConfig, split_hostport
from prfaas_plugin.transfer.errors import from_rpc_error
from prfaas_plugin.transfer.pacing import Pacer
from prfaas_plugin.transfer.staging import Stager, torch_pinned_stager
from prfaas_plugin.transfer.telemetry import SenderTelemetry, tcp_info

_GRPC_OPTS = [("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)]
_seq = itertools.count()
#: Pause between Opens of a session the receiver has not announced yet.
_KNOCK_PAUSE_S = 0.05


class SendState(enum.Enum):
    """Life of one send session: opening -> open -> done, or failed from either."""

    OPENING = "opening"  # Open sent, waiting for the receiver's Accepted
    OPEN = "open"  # accepted: chunks flow
    FAILED = "failed"
    DONE = "done"

    @property
    def finished(self) -> bool:
        return self in (SendState.FAILED, SendState.DONE)


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A queued byte range of one item; ``resend`` after a checksum failure or a dead link."""

    item: int
    offset: int
    length: int
    resend: bool = False


@dataclass(frozen=True, slots=True)
class _Frame:
    """What a link sends next: one chunk, or consecutive first-time chunks of one item."""

    handle: _SendHandle
    item: int
    offset: int
    length: int
    resend: bool


class _SendHandle(SendHandle):
    def __init__(
        self, sender: GrpcTcpSender, endpoint: str, manifest: TransferManifest, token: str, deadline_s: float
    ) -> None:
        self.sender = sender
        self.endpoint = endpoint
        self.manifest = manifest
        self.request_id = manifest.request_id
        self.token = token
        self.deadline_s = deadline_s
        self.seq = next(_seq)
        self.done: Future[None] = Future()
        self.done.set_running_or_notify_cancel()
        self.index = {it.name: i for i, it in enumerate(manifest.items)}
        self.lock = threading.Lock()
        self.state = SendState.OPENING
        self.data: list[Any] = [None] * len(manifest.items)
        #: per item, the leading bytes the receiver already holds (Accepted.skip_bytes): not sent
        self.base: list[int] = [0] * len(manifest.items)
        self.key = b""
        self.checksum: wire.Checksum = wire.CHECKSUMS["crc32"]
        #: Largest data frame for this session (whole chunks of one item): the receiver's
        #: Accepted.max_frame_bytes capped by ours; one chunk for old receivers, the gRPC plane
        #: and a paced sender (a big frame would be one lump of the pacing budget).
        self.frame_cap = sender.config.chunk_bytes
        self.peer: _Peer | None = None
        self.call: Any = None
        self.t0 = time.monotonic()
        # Guarded by the peer's lock once accepted:
        self.pending: collections.deque[_Chunk] = collections.deque()
        self.sent_on: dict[int, dict[int, int]] = {}
        self.retries: collections.Counter[tuple[int, int]] = collections.Counter()
        self.items_confirmed: set[int] = set()
        self.bytes_sent = 0
        self.bytes_confirmed = 0

    # -- API ------------------------------------------------------------------------------
    def send(self, name: str, data: Any) -> None:
        idx = self.index.get(name)
        if idx is None:
            raise ProtocolError(f"{self.request_id}: item {name!r} is not in the manifest")
        item = self.manifest.items[idx]
        # Only a device tensor (or a custom stager's type) can need staging; looking up the
        # default stager imports torch, so it is not done for plain host buffers.
        stager = self.sender._stager
        if stager is None and is_device_tensor(data):
            stager = self.sender.stager
        if stager is not None and stager.wants(data):
            src: Any = data
            nbytes = stager.nbytes(data)
        elif is_device_tensor(data):
            raise ValueError("device tensor given but this sender has no stager")
        else:
            src = byte_view(data)
            nbytes = len(src)
        if nbytes != item.nbytes:
            raise ValueError(f"{self.request_id}: item {name!r} has {nbytes} bytes, manifest says {item.nbytes}")
        with self.lock:
            if self.state.finished:
                exc = self.done.exception() if self.done.done() else None
                if isinstance(exc, TransferError):
                    raise exc
                raise Aborted(f"{self.request_id}: session is {self.state.value}")
            if self.data[idx] is not None:
                raise ValueError(f"{self.request_id}: item {name!r} was already sent")
            self.data[idx] = src
            if self.state is SendState.OPEN and self.peer is not None:
                self.peer.enqueue(self, [idx])

    def abort(self, reason: str = "aborted by sender") -> None:
        with self.lock:
            key, state = self.key, self.state
        if state.finished:
            return
        if key:
            try:
                stub = self.sender._channel(self.endpoint).unary_unary(
                    f"/{SERVICE}/Abort",
                    request_serializer=pb.AbortRequest.SerializeToString,
                    response_deserializer=pb.AbortReply.FromString,
                )
                stub(pb.AbortRequest(request_id=self.request_id, session_key=key, reason=reason), timeout=2.0)
            except grpc.RpcError:
                pass  # the receiver also sees the cancelled stream below
        self.fail(Aborted(f"{self.request_id}: {reason}"))

    def progress(self) -> Mapping[str, Any]:
        return {
            "state": self.state.value,
            "bytes_sent": self.bytes_sent,
            "bytes_confirmed": self.bytes_confirmed,
            "bytes_skipped": sum(self.base),
            "items_confirmed": len(self.items_confirmed),
            "items_total": len(self.manifest.items),
            "elapsed_s": time.monotonic() - self.t0,
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def payload(self, idx: int, offset: int, length: int) -> contextlib.AbstractContextManager[memoryview]:
        src = self.data[idx]
        if src is None:
            raise Aborted(f"{self.request_id}: released")
        if isinstance(src, memoryview):
            return contextlib.nullcontext(src[offset : offset + length])
        assert self.sender.stager is not None
        return self.sender.stager.stage(src, offset, length)

    def accepted(self, acc: pb.Accepted) -> None:
        host = acc.data_host or split_hostport(self.endpoint)[0]
        peer = self.sender._peer(acc.data_plane, host, acc.data_port, self.endpoint)
        with self.lock:
            if self.state is not SendState.OPENING:
                return
            self.key = acc.session_key
            algo = acc.checksum or "crc32"
            if algo not in wire.available(self.sender.config.effective_checksums):
                raise ProtocolError(f"{self.request_id}: receiver chose checksum {algo!r}, not offered")
            self.checksum = wire.CHECKSUMS[algo]
            if acc.skip_bytes:
                items = self.manifest.items
                if len(acc.skip_bytes) != len(items) or any(b > it.nbytes for b, it in zip(acc.skip_bytes, items)):
                    raise ProtocolError(f"{self.request_id}: receiver's skip_bytes do not fit the manifest")
                self.base = [int(b) for b in acc.skip_bytes]
            cfg = self.sender.config
            if acc.data_plane == "tcp" and acc.max_frame_bytes and cfg.pacing_gbps is None:
                cap = min(cfg.frame_bytes, int(acc.max_frame_bytes))
                self.frame_cap = max(cfg.chunk_bytes, cap - cap % cfg.chunk_bytes)
            self.peer = peer
            self.state = SendState.OPEN
            peer.register(self, [i for i, d in enumerate(self.data) if d is not None])

    def fail(self, err: TransferError) -> None:
        with self.lock:
            if self.state.finished:
                return
            self.state = SendState.FAILED
            peer, call = self.peer, self.call
        if peer is not None:
            peer.unregister(self)
        if call is not None:
            call.cancel()
        self._finish(err)

    def complete(self) -> None:
        with self.lock:
            if self.state is not SendState.OPEN:
                return
            self.state = SendState.DONE
            peer = self.peer
        if peer is not None:
            peer.unregister(self)
        self._finish(None)

    def _finish(self, err: TransferError | None) -> None:
        self.data = [None] * len(self.data)
        self.peer = None
        self.call = None
        self.sender._forget(self, err)
        if err is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(err)


class _Link:
    """One data connection of a peer and the thread that feeds it."""

    def __init__(self, peer: _Peer, lid: int) -> None:
        self.peer = peer
        self.id = lid
        self.sock: socket.socket | None = None
        self.failures = 0
        self.dead = False
        self.thread = threading.Thread(target=self._run, name=f"prfaas-tx-{peer.name}-{lid}", daemon=True)

    def _connect(self) -> socket.socket:
        p = self.peer
        s = socket.create_connection((p.host, p.port), timeout=p.sender.config.connect_timeout_s)
        wire.tune_socket(s, p.sender.config.socket_buffer_bytes)
        if p.sender._ssl is not None:
            tls = p.sender.config.tls
            s = p.sender._ssl.wrap_socket(s, server_hostname=(tls.server_name if tls else None) or p.host)
        s.settimeout(None)
        s.sendall(wire.HELLO)
        return s

    def _run(self) -> None:
        p = self.peer
        use_sendmsg = p.sender._ssl is None
        while not p.closed.is_set() and not self.dead:
            if self.sock is None:
                try:
                    self.sock = self._connect()
                    self.failures = 0
                except (OSError, ValueError) as e:
                    self._failed(e)
                    continue
            job = p.next_chunk(self.id, 0.25)
            if job is None:
                if self._peer_closed():
                    self._failed(ConnectionError("receiver closed the data connection"))
                continue
            h, idx, off, ln = job.handle, job.item, job.offset, job.length
            with contextlib.ExitStack() as held:
                try:
                    view = held.enter_context(h.payload(idx, off, ln))
                    ck = h.checksum
                    hdr = wire.pack_header(h.key, idx, off, ln, ck.digest(view), ck.wide)
                except TransferError:
                    continue  # the request was released meanwhile; nothing to send
                except Exception as e:
                    # The payload could not be read or staged: that fails the request, not the
                    # link (a link failure requeues the frame, which would fail the same way).
                    h.fail(ProtocolError(f"{h.request_id}: cannot read item {idx}: {e!r}"))
                    continue
                try:
                    p.sender.pacer.consume(len(hdr) + ln, p.closed)
                    wire.send_frame(self.sock, hdr, view, use_sendmsg)
                except (OSError, ValueError) as e:
                    self._failed(e)
                    continue
            p.sent(h, ln, job.resend)

    def _peer_closed(self) -> bool:
        """The receiver never writes on a data connection, so a readable socket means EOF or
        a reset: without this check, chunks written just before a silent close would be lost
        without the link ever failing a write (and never resent)."""
        s = self.sock
        if s is None:
            return False
        try:
            readable, _, _ = select.select([s], [], [], 0)
            if not readable:
                return False
            s.setblocking(False)
            try:
                return s.recv(1) == b""
            finally:
                s.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # TLS housekeeping (session tickets), not data
        except (OSError, ValueError):
            return True

    def _failed(self, err: Exception) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self.failures += 1
        if self.failures >= 3:
            self.dead = True
        self.peer.link_failed(self, err)
        if not self.dead:
            self.peer.closed.wait(0.05 * self.failures)

    def info(self) -> dict[str, float] | None:
        s = self.sock
        return tcp_info(s) if s is not None else None


class _GrpcLink(_Link):
    """Fallback link: one long-lived client stream of DataChunk messages on its own channel."""

    def _run(self) -> None:
        p = self.peer
        opts = _GRPC_OPTS + [("grpc.use_local_subchannel_pool", 1)]
        channel = p.sender._make_channel(p.control_endpoint, opts)
        push = channel.stream_unary(
            f"/{SERVICE}/PushData",
            request_serializer=pb.DataChunk.SerializeToString,
            response_deserializer=pb.PushSummary.FromString,
        )
        try:
            while not p.closed.is_set() and not self.dead:
                try:
                    push(self._chunks())
                    self.failures = 0
                except grpc.RpcError as e:
                    self._failed(e)
        finally:
            channel.close()

    def _chunks(self) -> Iterator[pb.DataChunk]:
        p = self.peer
        while not p.closed.is_set():
            job = p.next_chunk(self.id, 0.25)
            if job is None:
                if self._peer_closed():
                    self._failed(ConnectionError("receiver closed the data connection"))
                continue
            h, idx, off, ln = job.handle, job.item, job.offset, job.length
            try:
                with h.payload(idx, off, ln) as view:
                    data = bytes(view)  # grpcio only sends bytes: the one copy of this path
            except TransferError:
                continue
            except Exception as e:
                h.fail(ProtocolError(f"{h.request_id}: cannot read item {idx}: {e!r}"))
                continue
            p.sender.pacer.consume(ln, p.closed)
            ck = h.checksum
            value = ck.digest(data)
            yield (
                pb.DataChunk(session_key=h.key, item=idx, offset=off, checksum64=value, data=data)
                if ck.wide
                else pb.DataChunk(session_key=h.key, item=idx, offset=off, crc32=value, data=data)
            )
            # gRPC asked for the next message: this stream works, so earlier failures were blips
            # (a TCP link counts from its last good connect the same way).
            self.failures = 0
            p.sent(h, ln, job.resend)


class _Peer:
    """Requests and data links towards one receiver data endpoint."""

    def __init__(self, sender: GrpcTcpSender, plane: str, host: str, port: int, control_endpoint: str) -> None:
        self.sender = sender
        self.plane = plane
        self.host, self.port = host, port
        self.control_endpoint = control_endpoint
        self.name = f"{host}:{port}" if plane == "tcp" else f"grpc:{control_endpoint}"
        self.cond = threading.Condition()
        self.closed = threading.Event()
        self.requests: dict[int, _SendHandle] = {}
        cls = _Link if plane == "tcp" else _GrpcLink
        self.links = [cls(self, i) for i in range(sender.config.connections)]
        for link in self.links:
            link.thread.start()

    def _chunks_of(self, h: _SendHandle, idx: int) -> Iterator[_Chunk]:
        n, c = h.manifest.items[idx].nbytes, h.sender.config.chunk_bytes
        for off in range(h.base[idx], n, c):
            yield _Chunk(idx, off, min(c, n - off))

    def register(self, h: _SendHandle, ready: list[int]) -> None:
        with self.cond:
            self.requests[h.seq] = h
            for idx in ready:
                h.pending.extend(self._chunks_of(h, idx))
            self.cond.notify_all()

    def enqueue(self, h: _SendHandle, ready: list[int]) -> None:
        with self.cond:
            if h.seq not in self.requests:
                return
            for idx in ready:
                h.pending.extend(self._chunks_of(h, idx))
            self.cond.notify_all()

    def unregister(self, h: _SendHandle) -> None:
        with self.cond:
            self.requests.pop(h.seq, None)
            h.pending.clear()
            h.sent_on.clear()

    def next_chunk(self, lid: int, timeout: float) -> _Frame | None:
        """The next frame for link ``lid``, or None after ``timeout``. A frame is
        one chunk, or consecutive first-time chunks of one item up to the session's frame cap
        and to this link's fair share of the request's queue (so a request still stripes over
        every link, and a big frame never leaves the other links idle)."""
        end = time.monotonic() + timeout
        with self.cond:
            while not self.closed.is_set():
                for h in self.requests.values():  # insertion order = open order = priority
                    if h.pending:
                        first = h.pending.popleft()
                        idx, off, ln, resend = first.item, first.offset, first.length, first.resend
                        sent_on = h.sent_on.setdefault(idx, {})
                        sent_on[off] = lid
                        if not resend and h.frame_cap > ln and isinstance(h.data[idx], memoryview):
                            share = len(h.pending) // max(1, sum(1 for lk in self.links if not lk.dead))
                            q = h.pending
                            while (
                                share > 0
                                and q
                                and q[0].item == idx
                                and q[0].offset == off + ln
                                and not q[0].resend
                                and ln + q[0].length <= h.frame_cap
                            ):
                                nxt = q.popleft()
                                sent_on[nxt.offset] = lid
                                ln += nxt.length
                                share -= 1
                        return _Frame(h, idx, off, ln, resend)
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
        return None

    def sent(self, h: _SendHandle, nbytes: int, resend: bool) -> None:
        h.bytes_sent += nbytes
        self.sender.telemetry.sent(self.name, nbytes, resend)

    def confirmed_item(self, h: _SendHandle, idx: int) -> None:
        with self.cond:
            h.sent_on.pop(idx, None)
            if idx not in h.items_confirmed:
                h.items_confirmed.add(idx)
                n = h.manifest.items[idx].nbytes - h.base[idx]
                h.bytes_confirmed += n
                self.sender.telemetry.confirmed(self.name, n)

    def resend(self, h: _SendHandle, idx: int, off: int) -> None:
        with self.cond:
            if h.seq not in self.requests or idx >= len(h.manifest.items):
                return
            h.retries[(idx, off)] += 1
            over = h.retries[(idx, off)] > self.sender.config.max_chunk_retries
            if not over:
                n, c = h.manifest.items[idx].nbytes, self.sender.config.chunk_bytes
                h.pending.appendleft(_Chunk(idx, off, min(c, n - off), resend=True))
                self.cond.notify_all()
        if over:
            h.fail(
                ChecksumError(
                    f"{h.request_id}: chunk {idx}@{off} failed its checksum "
                    f"{self.sender.config.max_chunk_retries + 1} times"
                )
            )

    def link_failed(self, link: _Link, err: Exception) -> None:
        """Requeue whatever that link sent for unconfirmed items on the others."""
        self.sender.telemetry.connection_failed(self.name)
        with self.cond:
            for h in self.requests.values():
                for idx, offs in h.sent_on.items():
                    c, n = self.sender.config.chunk_bytes, h.manifest.items[idx].nbytes
                    for off, lid in list(offs.items()):
                        if lid == link.id:
                            del offs[off]
                            h.pending.appendleft(_Chunk(idx, off, min(c, n - off), resend=True))
            all_dead = all(lk.dead for lk in self.links)
            victims = list(self.requests.values()) if all_dead else []
            self.cond.notify_all()
        if all_dead:
            self.sender._drop_peer(self)
            for h in victims:
                h.fail(PeerGone(f"{h.request_id}: every data connection to {self.name} failed: {err}"))

    def live(self) -> dict[str, Any]:
        with self.cond:
            queued = sum(len(h.pending) for h in self.requests.values())
            inflight = sum(max(0, h.bytes_sent - h.bytes_confirmed) for h in self.requests.values())
            nreq = len(self.requests)
        infos = [i for i in (lk.info() for lk in self.links) if i]
        d: dict[str, Any] = {
            "peer": self.name,
            "queue_chunks": queued,
            "bytes_in_flight": inflight,
            "requests": nreq,
            "connections": sum(1 for lk in self.links if lk.sock is not None),
        }
        if infos:
            d["rtt_ms"] = sum(i["rtt_ms"] for i in infos) / len(infos)
            d["total_retrans"] = sum(i["total_retrans"] for i in infos)
        return d

    def close(self) -> None:
        self.closed.set()
        with self.cond:
            self.cond.notify_all()
        for lk in self.links:
            if lk.sock is not None:
                try:
                    lk.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for lk in self.links:
            lk.thread.join(timeout=2.0)


class GrpcTcpSender(TransferSender):
    """The sender: one instance per process is enough; it pools channels and connections."""

    def __init__(self, config: SenderConfig | None = None, stager: Stager | None = None) -> None:
        self.config = config or SenderConfig()
        self.telemetry = SenderTelemetry()
        self.pacer = Pacer(self.config.pacing_gbps, self.config.chunk_bytes)
        self._ssl = tlsmod.client_context(self.config.tls) if self.config.tls is not None else None
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._channel_used: dict[str, float] = {}  # endpoint -> monotonic time of its last use
        self._peers: dict[tuple[str, str, int, str], _Peer] = {}
        self._handles: dict[int, _SendHandle] = {}
        self._closed = False
        self._stager = stager
        self._stager_default = stager is None

    @property
    def stager(self) -> Stager | None:
        if self._stager is None and self._stager_default:
            self._stager_default = False
            try:
                import torch

                if torch.cuda.is_available():
                    self._stager = torch_pinned_stager(self.config.staging_bytes, self.config.chunk_bytes)
            except ImportError:
                pass
        return self._stager

    def open(self, endpoint: str, manifest: TransferManifest, token: str, deadline_s: float = 60.0) -> SendHandle:
        split_hostport(endpoint)
        if deadline_s <= 0:
            raise ValueError("deadline_s must be > 0")
        if self._closed:
            raise RuntimeError("sender is closed")
        h = _SendHandle(self, endpoint, manifest, token, deadline_s)
        with self._lock:
            self._handles[h.seq] = h
        threading.Thread(
            target=self._control, args=(h,), name=f"prfaas-tx-ctl-{manifest.request_id[:12]}", daemon=True
        ).start()
        return h

    def close(self) -> None:
        self._closed = True
        with self._lock:
            handles = list(self._handles.values())
            peers = list(self._peers.values())
            self._peers.clear()
        for h in handles:
            h.fail(Aborted(f"{h.request_id}: sender closed"))
        for p in peers:
            p.close()
        with self._lock:
            chans = list(self._channels.values())
            self._channels.clear()
            self._channel_used.clear()
        for c in chans:
            c.close()

    def stats(self) -> dict[str, Any]:
        """Python telemetry API: per-peer goodput, bytes in flight, queue depth, TCP_INFO,
        per-request transfer times."""
        with self._lock:
            peers = list(self._peers.values())
            active = len(self._handles)
            channels = len(self._channels)
        snap = self.telemetry.snapshot(p.live() for p in peers)
        snap["requests_active"] = active
        snap["control_channels"] = channels
        snap["connections"] = sum(p.live()["connections"] for p in peers)
        return snap

    def __enter__(self) -> GrpcTcpSender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------
    def _make_channel(self, endpoint: str, opts: list[tuple[str, Any]]) -> grpc.Channel:
        if self.config.tls is not None:
            tls = self.config.tls
            if tls.server_name:
                opts = opts + [("grpc.ssl_target_name_override", tls.server_name)]
            return grpc.secure_channel(endpoint, tlsmod.grpc_channel_credentials(tls), options=opts)
        return grpc.insecure_channel(endpoint, options=opts)

    def _channel(self, endpoint: str) -> grpc.Channel:
        now = time.monotonic()
        with self._lock:
            ch = self._channels.get(endpoint)
            if ch is None:
                ch = self._channels[endpoint] = self._make_channel(endpoint, _GRPC_OPTS)
            self._channel_used[endpoint] = now
            busy = {h.endpoint for h in self._handles.values()} | {endpoint}
            idle = [
                ep
                for ep, used in self._channel_used.items()
                if ep not in busy and now - used > self.config.channel_idle_s
            ]
            stale = [self._channels.pop(ep) for ep in idle]
            for ep in idle:
                del self._channel_used[ep]
        for c in stale:
            c.close()
        return ch

    def _peer(self, plane: str, host: str, port: int, control_endpoint: str) -> _Peer:
        key = (plane, host, port, control_endpoint if plane == "grpc" else "")
        with self._lock:
            p = self._peers.get(key)
            if p is None:
                p = self._peers[key] = _Peer(self, plane, host, port, control_endpoint)
            return p

    def _drop_peer(self, peer: _Peer) -> None:
        with self._lock:
            for k, v in list(self._peers.items()):
                if v is peer:
                    del self._peers[k]
        peer.closed.set()

    def _forget(self, h: _SendHandle, err: TransferError | None) -> None:
        with self._lock:
            self._handles.pop(h.seq, None)
        self.telemetry.finished(time.monotonic() - h.t0, err)

    def _knock_again(self, h: _SendHandle, e: grpc.RpcError) -> bool:
        """True when the receiver has not announced the session yet and ``announce_wait_s`` (and
        the deadline) leave time for another Open; each refusal already waited the receiver's grace."""
        if not hasattr(e, "code") or e.code() != grpc.StatusCode.NOT_FOUND or h.state is not SendState.OPENING:
            return False
        elapsed = time.monotonic() - h.t0
        if elapsed + _KNOCK_PAUSE_S >= min(self.config.announce_wait_s, h.deadline_s):
            return False
        time.sleep(_KNOCK_PAUSE_S)
        return h.state is SendState.OPENING

    def _control(self, h: _SendHandle) -> None:
        use_transfer_cpus()  # started from the caller's (maybe pinned) thread
        m = h.manifest
        planes = ["grpc"] if self.config.data_plane == "grpc" else ["tcp", "grpc"]
        req = pb.OpenRequest(
            protocol_version=PROTOCOL_VERSION,
            request_id=m.request_id,
            sender_id=m.sender_id or self.config.sender_id,
            fingerprint_json=m.fingerprint.canonical(),
            fingerprint_digest=m.fingerprint.digest(),
            items=[pb.ItemSpec(name=i.name, nbytes=i.nbytes, order=i.order) for i in m.items],
            token=h.token,
            chunk_bytes=self.config.chunk_bytes,
            data_planes=planes,
            metadata_json=json.dumps(dict(m.metadata), default=str) if m.metadata else "",
            checksums=wire.available(self.config.effective_checksums),
            partial_items=True,
        )
        try:
            stream = self._channel(h.endpoint).unary_stream(
                f"/{SERVICE}/Open",
                request_serializer=pb.OpenRequest.SerializeToString,
                response_deserializer=pb.ReceiverEvent.FromString,
            )
            while True:
                left = h.deadline_s - (time.monotonic() - h.t0)
                try:
                    call = stream(req, timeout=max(left, 0.001))
                    with h.lock:
                        if h.state is not SendState.OPENING:
                            call.cancel()
                            return
                        h.call = call
                    for ev in call:
                        kind = ev.WhichOneof("event")
                        if kind == "accepted":
                            h.accepted(ev.accepted)
                        elif kind == "item_done" and h.peer is not None:
                            h.peer.confirmed_item(h, ev.item_done.item)
                        elif kind == "resend" and h.peer is not None:
                            h.peer.resend(h, ev.resend.item, ev.resend.offset)
                        elif kind == "completed":
                            h.complete()
                            return
                    h.fail(ProtocolError(f"{m.request_id}: session stream ended without completion"))
                    return
                except grpc.RpcError as e:
                    if self._knock_again(h, e):
                        continue
                    err = from_rpc_error(e, m.request_id)
                    if isinstance(err, PeerGone) and self.config.tls is not None:
                        why = tlsmod.probe_refusal(h.endpoint, self.config.tls)
                        if why:
                            err = AuthError(f"{m.request_id}: TLS handshake with {h.endpoint} refused: {why}")
                    h.fail(err)
                    return
        except TransferError as e:
            h.fail(e)
        except Exception as e:  # never leave done unresolved
            h.fail(ProtocolError(f"{m.request_id}: sender control loop failed: {e!r}"))
