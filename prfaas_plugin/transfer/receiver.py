"""Decode side: a gRPC control server plus a raw TCP data listener.

Bytes land straight in the adapter's buffers: a data frame's header names the session (by the
random key issued at Open), the item and the offset, and the payload is ``recv_into`` the
matching slice of the sink buffer, then checksummed in place. Nothing is staged, so receiver
memory is bounded by what the adapter hands out."""

from __future__ import annotations

import collections
import enum
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from concurrent.futures import Future
from typing import Any

import grpc

from prfaas_plugin.protocol.transfer import GRPC_SERVICE as SERVICE
from prfaas_plugin.protocol.transfer import MIN_TOKEN_CHARS
from prfaas_plugin.protocol.transfer import TRANSFER_PROTOCOL_VERSION as PROTOCOL_VERSION
from prfaas_plugin.transfer import tls as tlsmod
from prfaas_plugin.transfer import wire
from prfaas_plugin.transfer._gen import transfer_pb2 as pb
from prfaas_plugin.transfer.affinity import use_transfer_cpus
from prfaas_plugin.transfer.api import (
    Aborted,
    AuthError,
    ChecksumError,
    FingerprintMismatch,
    ItemSpec,
    LayoutFingerprint,
    PeerGone,
    ProtocolError,
    ReceiveHandle,
    ReceiveSink,
    TransferError,
    TransferManifest,
    TransferReceiver,
    TransferTimeout,
)
from prfaas_plugin.transfer.buffers import byte_view
from prfaas_plugin.transfer.config import ReceiverConfig, split_hostport
from prfaas_plugin.transfer.errors import code_for
from prfaas_plugin.transfer.telemetry import ReceiverTelemetry


class ChunkState(enum.IntEnum):
    """Per chunk of an item, kept in a bytearray (one byte per chunk)."""

    EMPTY = 0
    RECEIVING = 1  # a frame is being read into it
    LANDED = 2  # bytes in place and checksum passed


class SessionState(enum.Enum):
    """Life of one receive session: announced (by ``expect``) -> open (the sender's Open was
    accepted) -> completed, or failed from either."""

    ANNOUNCED = "announced"
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (SessionState.COMPLETED, SessionState.FAILED)


class _Session:
    """One announced request. All mutable state is guarded by ``cond``."""

    def __init__(
        self,
        owner: GrpcTcpReceiver,
        request_id: str,
        token: str,
        fingerprint: LayoutFingerprint,
        sink: ReceiveSink,
        deadline_s: float,
    ) -> None:
        self.owner = owner
        self.request_id = request_id
        self.token = token
        self.fingerprint = fingerprint
        self.sink: ReceiveSink | None = sink
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.cond = threading.Condition()
        self.state = SessionState.ANNOUNCED
        self.key = b""
        self.error: TransferError | None = None
        self.manifest: TransferManifest | None = None
        self.items: list[ItemSpec] = []
        self.buffers: list[memoryview] = []
        self.base: list[int] = []  # per item: leading bytes the sink already holds (not sent)
        self.chunk = 0
        self.checksum_name = "crc32"
        self.checksum: wire.Checksum = wire.CHECKSUMS["crc32"]
        self.chunk_state: list[bytearray] = []
        #: (item, chunk) whose resent copy was drained while an earlier copy was still arriving
        #: on another connection: if that copy is then lost, the chunk is asked for again.
        self.copy_dropped: set[tuple[int, int]] = set()
        self.chunks_left: list[int] = []
        self.callbacks_left = 0
        self.bytes_landed = 0
        self.items_done = 0
        self.checksum_failures = 0
        self.events: list[Any] = []
        self.progress_dirty = False
        self.last_progress = 0.0
        self.active = 0
        self.active_socks: collections.Counter[Any] = collections.Counter()
        self.handle = _ReceiveHandle(self)

    # -- data path ------------------------------------------------------------------------
    def _span(self, item: int, offset: int, length: int) -> tuple[int, int]:
        """Chunk indices [first, last) of a frame already checked by ``_chunk_range``."""
        first = (offset - self.base[item]) // self.chunk
        return first, first + (length + self.chunk - 1) // self.chunk

    def _chunk_range(self, item: int, offset: int, length: int, multi: bool) -> tuple[int, int]:
        """Chunk indices [first, last) a frame covers; raises ProtocolError for a frame that is
        not whole chunks of the item (one chunk, or several with ``multi``: the TCP plane)."""
        if item >= len(self.items):
            raise ProtocolError(f"{self.request_id}: item index {item} out of range")
        nbytes, base, c = self.items[item].nbytes, self.base[item], self.chunk
        end = offset + length
        ok = base <= offset < nbytes and not (offset - base) % c and length > 0 and end <= nbytes
        if ok and not (multi and length > c):
            ok = length == min(c, nbytes - offset)
        elif ok:
            ok = end == nbytes or not length % c
        if not ok:
            raise ProtocolError(
                f"{self.request_id}: bad chunk item={item} offset={offset} length={length} "
                f"(item {nbytes} bytes from {base}, chunk {c})"
            )
        return self._span(item, offset, length)

    def begin_chunk(self, item: int, offset: int, length: int, sock: Any, multi: bool = False) -> memoryview | None:
        """The slice to receive a frame into, or None to drain it (late, duplicate or failed
        session). A frame is one chunk or, with ``multi`` (TCP plane), consecutive chunks."""
        with self.cond:
            if self.state is not SessionState.OPEN:
                return None
            first, last = self._chunk_range(item, offset, length, multi)
            states = self.chunk_state[item]
            fresh = [i for i in range(first, last) if states[i] == ChunkState.EMPTY]
            if len(fresh) != last - first:
                self.owner.telemetry.bump("duplicate_chunks")
                self.copy_dropped.update((item, i) for i in range(first, last) if states[i] == ChunkState.RECEIVING)
                if fresh:
                    # Part of the frame is new (a resend overlapping chunks that landed):
                    # drain it and ask for the missing chunks one by one.
                    for i in fresh:
                        self.events.append(
                            pb.ReceiverEvent(
                                resend=pb.Resend(
                                    item=item, offset=self.base[item] + i * self.chunk, reason="overlapping frame"
                                )
                            )
                        )
                    self.cond.notify_all()
                return None
            for i in range(first, last):
                states[i] = ChunkState.RECEIVING
            self.active += 1
            self.active_socks[sock] += 1
            return self.buffers[item][offset : offset + length]

    def end_chunk(self, item: int, offset: int, length: int, ok: bool | None, sock: Any) -> None:
        """``ok``: True landed and verified, False checksum mismatch, None connection lost.
        Only for a frame ``begin_chunk`` handed a buffer out for."""
        item_complete = False
        fail: TransferError | None = None
        with self.cond:
            self.active -= 1
            self.active_socks[sock] -= 1
            if self.active_socks[sock] <= 0:
                del self.active_socks[sock]
            if self.state is not SessionState.OPEN:
                self.cond.notify_all()  # fail() may be waiting for the last writer
                return
            first, last = self._span(item, offset, length)
            states = self.chunk_state[item]
            again = [i for i in range(first, last) if (item, i) in self.copy_dropped] if self.copy_dropped else []
            self.copy_dropped.difference_update((item, i) for i in again)
            if ok:
                for i in range(first, last):
                    states[i] = ChunkState.LANDED
                self.bytes_landed += length
                self.chunks_left[item] -= last - first
                item_complete = self.chunks_left[item] == 0
                self.progress_dirty = True
                # Wake the event stream only when a progress report is due: a wake-up per chunk
                # costs a context switch and a GIL hand-off on the data path.
                if time.monotonic() - self.last_progress >= 0.01:
                    self.cond.notify_all()
            else:
                for i in range(first, last):
                    states[i] = ChunkState.EMPTY
                if ok is None and again:
                    # This connection died mid-frame after the sender's resend of these chunks
                    # was drained as a duplicate: nobody would send them again.
                    for i in again:
                        self.events.append(
                            pb.ReceiverEvent(
                                resend=pb.Resend(item=item, offset=self.base[item] + i * self.chunk, reason="copy lost")
                            )
                        )
                    self.cond.notify_all()
                if ok is False:
                    self.checksum_failures += 1
                    if self.checksum_failures > self.owner.config.max_checksum_failures:
                        fail = ChecksumError(
                            f"{self.request_id}: {self.checksum_failures} chunks failed their checksum"
                        )
                    else:
                        for i in range(first, last):  # the sender resends chunk by chunk
                            self.events.append(
                                pb.ReceiverEvent(
                                    resend=pb.Resend(
                                        item=item, offset=self.base[item] + i * self.chunk, reason="checksum mismatch"
                                    )
                                )
                            )
                        self.cond.notify_all()
        if ok:
            self.owner.telemetry.landed(length)
        elif ok is False:
            self.owner.telemetry.bump("checksum_failures")
        if fail is not None:
            self.fail(fail)
        elif item_complete:
            self._item_complete(item)

    def _item_complete(self, item: int) -> None:
        sink = self.sink
        try:
            if sink is not None:
                sink.item_done(self.items[item])
        except TransferError as e:
            self.fail(e)
            return
        except Exception as e:  # the adapter's callback broke: fail loudly, both sides
            self.fail(ProtocolError(f"{self.request_id}: item_done({self.items[item].name}) raised {e!r}"))
            return
        with self.cond:
            if self.state is not SessionState.OPEN:
                return
            self.items_done += 1
            self.events.append(pb.ReceiverEvent(item_done=pb.ItemDone(item=item, bytes_landed=self.bytes_landed)))
            self.callbacks_left -= 1
            last = self.callbacks_left == 0
            self.cond.notify_all()
        if last:
            self._complete()

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, req: pb.OpenRequest) -> TransferError | None:
        """Validate an Open against the announcement; returns the error that refuses it."""
        with self.cond:
            if self.state is not SessionState.ANNOUNCED:
                return AuthError(f"{req.request_id}: session already opened or finished (tokens are single-use)")
            if not hmac.compare_digest(req.token.encode(), self.token.encode()):
                self.owner.telemetry.bump("auth_refusals")
                return AuthError(f"{req.request_id}: wrong token")
            if req.protocol_version != PROTOCOL_VERSION:
                return ProtocolError(
                    f"{req.request_id}: protocol version {req.protocol_version} unsupported (want {PROTOCOL_VERSION})"
                )
            if req.fingerprint_digest != self.fingerprint.digest():
                try:
                    theirs = LayoutFingerprint(json.loads(req.fingerprint_json))
                    diff = "; ".join(theirs.diff(self.fingerprint)) or "digest differs"
                except ValueError:
                    diff = "unreadable sender fingerprint"
                return FingerprintMismatch(
                    f"{req.request_id}: layout fingerprint mismatch (sender != receiver): {diff}"
                )
            cfg = self.owner.config
            accepted = wire.available(cfg.effective_checksums)
            algo = wire.choose_checksum(list(req.checksums), accepted)
            if algo is None:
                return ProtocolError(
                    f"{req.request_id}: no common checksum (offered {list(req.checksums)}, accepted here {accepted})"
                )
            if not 4096 <= req.chunk_bytes <= cfg.max_chunk_bytes:
                return ProtocolError(
                    f"{req.request_id}: chunk_bytes {req.chunk_bytes} outside 4 KiB..{cfg.max_chunk_bytes}"
                )
            try:
                items = [ItemSpec(i.name, int(i.nbytes), int(i.order)) for i in req.items]
                manifest = TransferManifest(
                    request_id=req.request_id,
                    items=tuple(items),
                    fingerprint=LayoutFingerprint(json.loads(req.fingerprint_json)),
                    sender_id=req.sender_id,
                    metadata=json.loads(req.metadata_json) if req.metadata_json else {},
                )
            except ValueError as e:
                return ProtocolError(f"{req.request_id}: bad manifest: {e}")
            buffers: list[memoryview] = []
            assert self.sink is not None
            for it in items:
                try:
                    mv = byte_view(self.sink.buffer_for(it), writable=True)
                except TransferError as e:
                    return e
                except Exception as e:  # a refusal, or the adapter's own failure (out of memory)
                    return ProtocolError(f"{req.request_id}: sink refused item {it.name!r}: {e!r}")
                if len(mv) != it.nbytes:
                    return ProtocolError(
                        f"{req.request_id}: sink buffer for {it.name!r} has {len(mv)} bytes, manifest says {it.nbytes}"
                    )
                buffers.append(mv)
            base = [0] * len(items)
            held = getattr(self.sink, "skip_bytes", None)
            if req.partial_items and held is not None:
                try:
                    base = [min(max(0, int(held(it))), it.nbytes) for it in items]
                except Exception as e:
                    return ProtocolError(f"{req.request_id}: sink cannot say what it holds: {e!r}")
            self.items, self.buffers, self.manifest, self.base = items, buffers, manifest, base
            self.chunk = req.chunk_bytes
            self.checksum_name = algo
            self.checksum = wire.CHECKSUMS[algo]
            nchunks = [(it.nbytes - b + self.chunk - 1) // self.chunk for it, b in zip(items, base)]
            self.chunk_state = [bytearray(n) for n in nchunks]
            self.chunks_left = list(nchunks)
            self.callbacks_left = len(items)
            self.key = secrets.token_bytes(16)
            self.state = SessionState.OPEN
        return None

    def start(self) -> None:
        """After Accepted went out: items with no bytes to send are complete at once."""
        empty = [i for i, it in enumerate(self.items) if it.nbytes == self.base[i]]  # fixed at open
        for i in empty:
            self._item_complete(i)
        if not self.items:
            self._complete()

    def _complete(self) -> None:
        with self.cond:
            if self.state is not SessionState.OPEN:
                return
            self.state = SessionState.COMPLETED
            elapsed = time.monotonic() - self.t0
            self.events.append(pb.ReceiverEvent(completed=pb.Completed(bytes=self.bytes_landed, seconds=elapsed)))
            self._release_locked()
            self.cond.notify_all()
        self.owner._forget(self, None)
        self.handle.done.set_result(self.manifest)  # type: ignore[arg-type]

    def fail(self, err: TransferError) -> None:
        with self.cond:
            if self.state.finished:
                return
            self.state = SessionState.FAILED
            self.error = err
            self.events.append(err)
            # Unblock readers stuck mid-chunk on this session (a stalled sender); their
            # connections are shared, the sender reconnects.
            for s in list(self.active_socks):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self.cond.notify_all()
            # No reader may still write into the adapter's buffers once done resolves.
            self.cond.wait_for(lambda: self.active == 0, timeout=10.0)
            self._release_locked()
        self.owner._forget(self, err)
        self.handle.done.set_exception(err)

    def _release_locked(self) -> None:
        self.buffers = []
        self.chunk_state = []
        self.sink = None

    def progress(self) -> dict[str, Any]:
        with self.cond:
            return {
                "state": self.state.value,
                "bytes_received": self.bytes_landed,
                "bytes_skipped": sum(self.base),
                "items_done": self.items_done,
                "items_total": len(self.items),
                "elapsed_s": time.monotonic() - self.t0,
                "checksum_failures": self.checksum_failures,
                "checksum": self.checksum_name,
                "error": str(self.error) if self.error else None,
            }


class _ReceiveHandle(ReceiveHandle):
    def __init__(self, session: _Session) -> None:
        self._s = session
        self.request_id = session.request_id
        self.done: Future[TransferManifest] = Future()
        self.done.set_running_or_notify_cancel()

    def abort(self, reason: str = "aborted by receiver") -> None:
        self._s.fail(Aborted(f"{self.request_id}: {reason}"))

    def progress(self) -> Mapping[str, Any]:
        return self._s.progress()


class GrpcTcpReceiver(TransferReceiver):
    """The receiver: gRPC control server + TCP data listener (+ gRPC data fallback)."""

    def __init__(self, config: ReceiverConfig | None = None) -> None:
        self.config = config or ReceiverConfig()
        self.telemetry = ReceiverTelemetry()
        self._lock = threading.Condition()
        self._by_request: dict[str, _Session] = {}
        self._by_key: dict[bytes, _Session] = {}
        self._tombstones: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._closed = threading.Event()
        self._data_conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        host, port = split_hostport(self.config.listen)
        self._host = host
        # Kept so close() can shut it down: grpc's server.stop() leaves the pool's threads alive.
        self._executor = futures.ThreadPoolExecutor(
            max_workers=self.config.max_workers,
            thread_name_prefix="prfaas-rx-grpc",
            initializer=use_transfer_cpus,
        )
        self._server = grpc.server(
            self._executor,
            options=[
                ("grpc.max_receive_message_length", 128 << 20),
                ("grpc.max_send_message_length", 128 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._server.add_generic_rpc_handlers((self._handlers(),))
        bind = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if self.config.tls is not None:
            self._port = self._server.add_secure_port(bind, tlsmod.grpc_server_credentials(self.config.tls))
        else:
            self._port = self._server.add_insecure_port(bind)
        if self._port == 0:
            raise OSError(f"cannot bind the gRPC control port on {bind}")
        self._data_sock: socket.socket | None = None
        self._ssl = tlsmod.server_context(self.config.tls) if self.config.tls is not None else None
        if self.config.enable_tcp_data:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            wire.tune_socket(s, self.config.socket_buffer_bytes)  # inherited by accepted sockets
            s.bind((host, self.config.data_port))
            s.listen(128)
            self._data_sock = s
            self._spawn(self._accept_loop, "prfaas-rx-accept")
        self._server.start()
        self._spawn(self._reaper, "prfaas-rx-reaper")

    # -- public API -----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def data_endpoint(self) -> str | None:
        if self.config.advertise_data:
            return self.config.advertise_data
        if self._data_sock is None:
            return None
        return f"{self._host}:{self._data_sock.getsockname()[1]}"

    @property
    def bound_data_endpoint(self) -> str | None:
        """Where the data listener really is (``data_endpoint`` may be an advertised proxy)."""
        if self._data_sock is None:
            return None
        return f"{self._host}:{self._data_sock.getsockname()[1]}"

    def expect(
        self, request_id: str, token: str, fingerprint: LayoutFingerprint, sink: ReceiveSink, deadline_s: float = 60.0
    ) -> ReceiveHandle:
        if not request_id:
            raise ValueError("request_id must be non-empty")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"token must be at least {MIN_TOKEN_CHARS} characters (128-bit secrets are expected)")
        if deadline_s <= 0:
            raise ValueError("deadline_s must be > 0")
        if self._closed.is_set():
            raise RuntimeError("receiver is closed")
        s = _Session(self, request_id, token, fingerprint, sink, deadline_s)
        with self._lock:
            if request_id in self._by_request:
                raise ValueError(f"request {request_id!r} is already expected")
            self._by_request[request_id] = s
            self._lock.notify_all()
        return s.handle

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            sessions = list(self._by_request.values())
        for s in sessions:
            s.fail(Aborted(f"{s.request_id}: receiver closed"))
        self._server.stop(grace=0.5).wait(2.0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._data_sock is not None:
            try:
                self._data_sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            try:
                self._data_sock.close()
            except OSError:
                pass
        with self._lock:
            conns = list(self._data_conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2.0)

    def stats(self) -> dict[str, Any]:
        """Python telemetry API: counters plus live session and connection counts."""
        snap = self.telemetry.snapshot()
        with self._lock:
            snap["sessions_active"] = len(self._by_request)
            snap["data_connections"] = len(self._data_conns)
        return snap

    def __enter__(self) -> GrpcTcpReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- bookkeeping ----------------------------------------------------------------------
    def _spawn(self, fn: Any, name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        if not name.startswith("prfaas-rx-conn"):
            self._threads.append(t)
        return t

    def _forget(self, s: _Session, err: TransferError | None) -> None:
        with self._lock:
            if self._by_request.get(s.request_id) is s:
                del self._by_request[s.request_id]
            if s.key and self._by_key.get(s.key) is s:
                del self._by_key[s.key]
                self._tombstones[s.key] = None
                while len(self._tombstones) > 65536:
                    self._tombstones.popitem(last=False)
        self.telemetry.session_end(err)

    def _reaper(self) -> None:
        while not self._closed.wait(0.05):
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._by_request.values() if s.deadline <= now]
            for s in late:
                s.fail(TransferTimeout(f"{s.request_id}: deadline passed in state {s.state.value!r}"))

    # -- gRPC control -------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Open": grpc.unary_stream_rpc_method_handler(
                    self._rpc_open,
                    request_deserializer=pb.OpenRequest.FromString,
                    response_serializer=pb.ReceiverEvent.SerializeToString,
                ),
                "Abort": grpc.unary_unary_rpc_method_handler(
                    self._rpc_abort,
                    request_deserializer=pb.AbortRequest.FromString,
                    response_serializer=pb.AbortReply.SerializeToString,
                ),
                "Status": grpc.unary_unary_rpc_method_handler(
                    self._rpc_status,
                    request_deserializer=pb.StatusRequest.FromString,
                    response_serializer=pb.StatusReply.SerializeToString,
                ),
                "PushData": grpc.stream_unary_rpc_method_handler(
                    self._rpc_push,
                    request_deserializer=pb.DataChunk.FromString,
                    response_serializer=pb.PushSummary.SerializeToString,
                ),
            },
        )

    def _rpc_open(self, req: pb.OpenRequest, context: grpc.ServicerContext) -> Iterator[pb.ReceiverEvent]:
        grace_end = time.monotonic() + self.config.announce_grace_s
        with self._lock:
            while req.request_id not in self._by_request and not self._closed.is_set():
                left = grace_end - time.monotonic()
                if left <= 0 or not context.is_active():
                    break
                self._lock.wait(min(left, 0.1))
            s = self._by_request.get(req.request_id)
        if s is None:
            self.telemetry.bump("auth_refusals")
            # NOT_FOUND, not UNAUTHENTICATED: the sender may try again while its announce_wait_s lasts
            context.abort(grpc.StatusCode.NOT_FOUND, f"{req.request_id}: no such session is expected here")
        err = s.open(req)
        if err is not None:
            if not (isinstance(err, AuthError) and s.state is not SessionState.ANNOUNCED):
                s.fail(err)  # a wrong token or layout ends the session on both sides
            context.abort(code_for(err), str(err))
        with self._lock:
            # Not if it failed meanwhile (its deadline): _forget has run, and would not again.
            if not s.state.finished:
                self._by_key[s.key] = s

        def sender_gone() -> None:
            s.fail(PeerGone(f"{s.request_id}: sender's session stream ended"))

        if not context.add_callback(sender_gone):
            # The RPC ended while the session opened (the sender gave up): nothing will resume
            # this generator, so the session must not wait for its deadline holding the buffers.
            sender_gone()
            return
        host = ""
        port = 0
        if self.data_endpoint is not None and "tcp" in req.data_planes:
            h, port = split_hostport(self.data_endpoint)
            host = h if self.config.advertise_data else ""
            plane = "tcp"
        else:
            plane = "grpc"
        yield pb.ReceiverEvent(
            accepted=pb.Accepted(
                session_key=s.key,
                data_plane=plane,
                data_host=host,
                data_port=port,
                receiver_id=self.config.receiver_id,
                checksum=s.checksum_name,
                skip_bytes=s.base if any(s.base) else [],  # non-zero only for senders offering partial_items
                max_frame_bytes=self.config.max_chunk_bytes if plane == "tcp" else 0,
            )
        )
        s.start()
        yield from self._events(s, context)

    def _events(self, s: _Session, context: grpc.ServicerContext) -> Iterator[pb.ReceiverEvent]:
        while True:
            with s.cond:
                s.cond.wait_for(
                    lambda: (
                        s.events
                        or s.state.finished
                        or (s.progress_dirty and time.monotonic() - s.last_progress >= 0.01)
                    ),
                    timeout=0.01 if s.progress_dirty else 0.5,
                )
                evs, s.events = s.events, []
                send_progress = s.progress_dirty and time.monotonic() - s.last_progress >= 0.01
                if send_progress:
                    s.progress_dirty = False
                    s.last_progress = time.monotonic()
                    prog = pb.ReceiverEvent(
                        progress=pb.ItemProgress(bytes_landed=s.bytes_landed, items_done=s.items_done)
                    )
            for ev in evs:
                if isinstance(ev, TransferError):
                    context.abort(code_for(ev), str(ev))
                yield ev
                if ev.WhichOneof("event") == "completed":
                    return
            if send_progress:
                yield prog
            if not context.is_active():
                return

    def _rpc_abort(self, req: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        with self._lock:
            s = self._by_request.get(req.request_id)
        if s is None or not s.key or not hmac.compare_digest(s.key, req.session_key):
            return pb.AbortReply(was_open=False)
        s.fail(Aborted(f"{req.request_id}: aborted by sender: {req.reason}"))
        return pb.AbortReply(was_open=True)

    def _rpc_status(self, req: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        with self._lock:
            s = self._by_request.get(req.request_id)
        if s is None or not s.key or not hmac.compare_digest(s.key, req.session_key):
            context.abort(grpc.StatusCode.NOT_FOUND, f"{req.request_id}: no open session with that key")
        p = s.progress()
        return pb.StatusReply(
            state=p["state"],
            bytes_landed=p["bytes_received"],
            items_done=p["items_done"],
            items_total=p["items_total"],
            elapsed_s=p["elapsed_s"],
            error=p["error"] or "",
        )

    def _rpc_push(self, it: Iterator[pb.DataChunk], context: grpc.ServicerContext) -> pb.PushSummary:
        n = b = 0
        for ch in it:
            with self._lock:
                s = self._by_key.get(ch.session_key)
                known = s is not None or ch.session_key in self._tombstones
            if not known:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "data chunk for an unknown session")
            if s is None:
                continue
            data = ch.data
            try:
                view = s.begin_chunk(ch.item, ch.offset, len(data), None)
            except ProtocolError as e:
                s.fail(e)
                continue
            if view is None:
                continue
            view[:] = data
            ck = s.checksum
            want = ch.checksum64 if ck.wide else ch.crc32
            s.end_chunk(ch.item, ch.offset, len(data), ck.running is None or ck.digest(view) == want, None)
            view = s = None
            n += 1
            b += len(data)
        return pb.PushSummary(chunks=n, bytes=b)

    # -- TCP data plane -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._data_sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._data_sock.accept()
            except OSError:
                return
            self._spawn(self._serve_conn, "prfaas-rx-conn", conn)

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10.0)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(conn, server_side=True)
            hello = bytearray(len(wire.HELLO))
            wire.recv_exact(conn, memoryview(hello))
            if bytes(hello) != wire.HELLO:
                raise ProtocolError("bad data-connection hello")
            conn.settimeout(None)
        except (OSError, ProtocolError, ConnectionError):
            conn.close()
            return
        with self._lock:
            self._data_conns.add(conn)
        hdr = bytearray(wire.HEADER64_SIZE)
        scratch = memoryview(bytearray(1 << 20))
        try:
            while not self._closed.is_set():
                hsize, (key, item, offset, length, value) = wire.recv_header(conn, hdr)
                with self._lock:
                    s = self._by_key.get(key)
                    known = s is not None or key in self._tombstones
                if not known:
                    raise ProtocolError("data frame for an unknown session")
                if length > self.config.max_chunk_bytes:
                    raise ProtocolError(f"data frame of {length} bytes exceeds the limit")
                view = None
                if s is not None:
                    ck = s.checksum
                    try:
                        if (hsize == wire.HEADER64_SIZE) != ck.wide:
                            raise ProtocolError(f"{s.request_id}: a {hsize}-byte frame header for a {ck.name} session")
                        view = s.begin_chunk(item, offset, length, conn, multi=True)
                    except ProtocolError as e:
                        s.fail(e)
                        raise
                if view is None:
                    wire.drain(conn, length, scratch)
                    continue
                assert s is not None
                try:
                    if ck.running is None:  # "none": TLS authenticated it, or a diagnostic run
                        wire.recv_exact(conn, view)
                        ok = True
                    else:
                        ok = wire.recv_exact_checksummed(conn, view, ck.running()) == value
                except BaseException:
                    s.end_chunk(item, offset, length, None, conn)
                    raise
                s.end_chunk(item, offset, length, ok, conn)
                view = s = None  # hold no reference to the adapter's memory between frames
        except (OSError, ConnectionError, ValueError, ProtocolError):
            pass
        finally:
            with self._lock:
                self._data_conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass
