"""SGLang's manager, sender, receiver and bootstrap server for the ``prfaas`` backend.

Built like SGLang's own Mooncake/NIXL backends: the ``Common*`` classes keep the parts every
backend shares (bootstrap registry over HTTP, ZMQ control sockets, rank mapping, heartbeats,
poll states, timeouts, abort notifications), and this module supplies the data path. The
data path differs from Mooncake's in direction of control: our transfer engine is push-only
and the receiver accepts only sessions it was told to expect, so

* decode's ``send_metadata`` first announces a session (id + fresh token) to its transfer
  receiver, with a sink that maps each item to the request's destination pages, state slots
  and metadata row, then tells prefill the session, token and destinations over SGLang's ZMQ;
* prefill opens that session at the request's first chunk and sends each group of pages as
  soon as the chunk completing it ran, then state components and the aux row after the last;
* decode reports ``Success`` only when its own receive handle says every byte landed (so the
  aux row SGLang's metadata gate checks is in place), prefill when the receiver confirmed.
  Every failure (engine error, deadline, abort from either side, dead peer, bad layout) marks
  the room ``Failed`` with a reason that SGLang raises as its own ``KVTransferError``.

Supported topologies: equal attention TP (any model), MLA with any TP, equal PP, DP. Others
(head-sliced MHA across TP widths, prefill CP, KV sharding, ``prefill_complete`` allocation,
host destinations) are refused at start or per request with a message that says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import secrets
import threading
import time
from typing import Any, ClassVar

import numpy as np
import zmq
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll, KVTransferDestination
from sglang.srt.disaggregation.common.conn import (
    ABORT_ACK_TAG,
    ABORT_TAG,
    AbortNotification,
    CommonKVBootstrapServer,
    CommonKVManager,
    CommonKVReceiver,
    CommonKVSender,
)
from sglang.srt.disaggregation.utils import DisaggregationMode

from prfaas_plugin.engines.sglang.config import BackendConfig
from prfaas_plugin.engines.sglang.memory import CudaSpace, HostSpace, MemorySpace, Region, space_for
from prfaas_plugin.engines.sglang.metrics import record_sent, sent_bytes_counter
from prfaas_plugin.engines.sglang.transport import TransportFactory, engine_transport
from prfaas_plugin.engines.sglang.wire import (
    AUX_NAME,
    META_TAG,
    REG_TAG,
    ST_NAME,
    STATUS_TAG,
    ItemRef,
    Layout,
    Metadata,
    Registration,
    WireError,
    group_pages,
    kv_item_name,
    parse_item_name,
    plan_items,
)
from prfaas_plugin.transfer.api import (
    ItemSpec,
    ReceiveHandle,
    SendHandle,
    TransferManifest,
)
from prfaas_plugin.transfer.binding import StagedSink, rank_port

logger = logging.getLogger(__name__)


class PrfaasBackendError(RuntimeError):
    """A configuration or topology this backend does not support."""


def layout_of(args: KVArgs, attn_tp_size: int, is_mla: bool) -> Layout:
    return Layout(
        page_size=int(args.page_size),
        kv_cache_dtype=str(args.kv_cache_dtype_str),
        kv_item_lens=tuple(int(x) for x in args.kv_item_lens),
        aux_item_lens=tuple(int(x) for x in args.aux_item_lens),
        state_types=tuple(getattr(t, "value", str(t)) for t in (args.state_types or [])),
        # A zero-length tensor (e.g. DSA index-K elided on a layer) carries nothing: item_len 0
        # keeps it out of the wire plan and the fingerprint on both sides alike.
        state_item_lens=tuple(
            tuple(int(i) if int(n) > 0 else 0 for i, n in zip(items, lens))
            for items, lens in zip(args.state_item_lens or [], args.state_data_lens or [])
        ),
        attn_tp_size=int(attn_tp_size),
        is_mla=bool(is_mla),
    )


def _sglang_device(server_args: Any) -> str:
    """The device SGLang resolved for its KV pools ("cuda", "cpu", ...)."""
    try:
        from sglang.srt.runtime_context import get_device

        device = get_device().device
    except Exception:  # context not published (embedders): fall back to the raw argument
        device = getattr(server_args, "device", None)
    if not device:
        raise PrfaasBackendError("cannot tell which device SGLang keeps its KV cache on")
    return str(device)


def _as_indices(x: Any) -> np.ndarray:
    if hasattr(x, "cpu") and hasattr(x, "numpy"):  # a torch tensor
        x = x.cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1)


@dataclasses.dataclass
class _Dest:
    """One decode rank a prefill room sends to. ``endpoint``/``dst_port``/``is_dummy``/
    ``required_dst_info_num`` are the names ``CommonKVManager`` reads from transfer infos."""

    meta: Metadata
    endpoint: str
    dst_port: int

    @property
    def is_dummy(self) -> bool:
        return self.meta.is_dummy

    @property
    def required_dst_info_num(self) -> int:
        return self.meta.required_dst_info_num


@dataclasses.dataclass
class _Chunk:
    room: int
    kv_indices: Any
    index_slice: slice
    is_last: bool
    aux_index: int | None
    state_indices: list[Any] | None
    wait_event: Any = None
    ready_event: Any = None


class _Outbound:
    """Prefill side of one (room, decode rank) session: turns SGLang's chunks into items."""

    def __init__(self, mgr: PrfaasKVManager, room: int, dest: _Dest, endpoint: str) -> None:
        self.mgr = mgr
        self.room = room
        self.dest = dest
        meta = dest.meta
        self.num_pages = int(meta.kv_indices.size)
        self.group = group_pages(self.num_pages, mgr.layout.kv_item_lens, mgr.config.item_bytes)
        state_counts = [None if s is None else int(s.size) for s in meta.state_indices]
        if len(state_counts) != len(mgr.layout.state_item_lens):
            raise PrfaasBackendError(
                f"decode sent {len(state_counts)} state index lists, this prefill has "
                f"{len(mgr.layout.state_item_lens)} state components"
            )
        self.state_counts = state_counts
        manifest = TransferManifest(
            request_id=meta.session_id,
            items=plan_items(mgr.layout, self.num_pages, state_counts, self.group),
            fingerprint=mgr.layout.fingerprint(),
            sender_id=f"sglang-prefill/{mgr.local_ip}:{mgr.rank_port}",
            metadata={"bootstrap_room": room},
        )
        self.src_pages = np.full(self.num_pages, -1, dtype=np.int64)
        self.produced = 0
        self.next_group = 0
        self.finished = False
        self._keep: list[Any] = []  # source buffers must outlive the send (zero-copy)
        self.handle: SendHandle = mgr.transfer_sender.open(endpoint, manifest, meta.token, mgr.config.deadline_s)

    def add_pages(self, index_slice: slice, kv: np.ndarray) -> None:
        start, stop = index_slice.start, index_slice.stop
        if start != self.produced or stop - start != kv.size or stop > self.num_pages:
            raise PrfaasBackendError(
                f"chunk covers pages [{start}, {stop}) with {kv.size} indices, expected to "
                f"continue at {self.produced} within {self.num_pages} pages"
            )
        self.src_pages[start:stop] = kv
        self.produced = stop
        while self.next_group < self.num_pages:
            count = min(self.group, self.num_pages - self.next_group)
            if self.next_group + count > self.produced:
                break
            pages = self.src_pages[self.next_group : self.next_group + count]
            for b, region in enumerate(self.mgr.kv_regions):
                self._send(kv_item_name(b, self.next_group, count), self.mgr.space.gather(region, pages))
            self.next_group += count

    def finish(self, state_indices: list[Any] | None, aux_index: int | None) -> None:
        if self.produced != self.num_pages:
            raise PrfaasBackendError(f"last chunk ended at page {self.produced} of {self.num_pages}")
        for c, count in enumerate(self.state_counts):
            if not count:
                continue
            src = state_indices[c] if state_indices is not None and c < len(state_indices) else None
            if src is None:
                raise PrfaasBackendError(f"decode expects state component {c}, prefill has none")
            idx = _as_indices(src)
            if idx.size != count:
                raise PrfaasBackendError(
                    f"state component {c} ({self.mgr.layout.state_types[c]}): prefill has "
                    f"{idx.size} slots/pages, decode expects {count}"
                )
            for t, region in enumerate(self.mgr.state_regions[c]):
                if region.item_len > 0 and region.nbytes > 0:
                    self._send(ST_NAME.encode(c, t), self.mgr.space.gather(region, idx))
        if aux_index is None:
            raise PrfaasBackendError("last chunk without a metadata buffer index")
        for j, region in enumerate(self.mgr.aux_regions):
            # A copy: the row is tiny, and the slot returns to SGLang's allocator on failure.
            self._send(AUX_NAME.encode(j), np.array(self.mgr.host.gather(region, [aux_index]), copy=True))
        self.finished = True

    def _send(self, name: str, data: Any) -> None:
        self._keep.append(data)
        self.handle.send(name, data)

    def release(self) -> None:
        self._keep.clear()


class PrfaasKVManager(CommonKVManager):
    """Owns one rank's transfer endpoint and the rooms in flight on it."""

    kv_status_msg_tag: ClassVar[bytes] = STATUS_TAG
    kv_status_msg_carries_reason: ClassVar[bool] = True
    reports_transfer_latency: ClassVar[bool] = True
    #: SGLang's ``/pd_role_switch`` (``--enable-pd-role-switch``) tears this manager down on an
    #: idle instance and builds one of the other role in the same process; ``teardown`` releases
    #: everything this manager owns, so the new one starts clean (same ports included).
    supports_role_switch: ClassVar[bool] = True
    #: Builds the transfer endpoints; tests may point it at another implementation.
    transport_factory: ClassVar[TransportFactory[BackendConfig]] = staticmethod(engine_transport)

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ):
        self.config = BackendConfig.from_env()
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        self._refuse_unsupported()
        self.layout = layout_of(args, self.attn_tp_size, bool(is_mla_backend))
        self.space: MemorySpace = space_for(_sglang_device(server_args), self.config.staging_pool_mb << 20)
        self.host = HostSpace()
        self.kv_regions = [
            Region(p, n, i, f"kv[{k}]")
            for k, (p, n, i) in enumerate(zip(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens))
        ]
        self.aux_regions = [
            Region(p, n, i, f"aux[{k}]")
            for k, (p, n, i) in enumerate(zip(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens))
        ]
        self.state_regions = [
            [
                Region(p, n, i, f"state[{c}:{t}]") if i > 0 and n > 0 else Region(0, 0, 1, f"state[{c}:{t}]")
                for t, (p, n, i) in enumerate(zip(ptrs, lens, items))
            ]
            for c, (ptrs, lens, items) in enumerate(
                zip(args.state_data_ptrs or [], args.state_data_lens or [], args.state_item_lens or [])
            )
        ]
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._room_lock = threading.Lock()
        transport = type(self).transport_factory(self.config)
        if disaggregation_mode == DisaggregationMode.PREFILL:
            # Made now, not at the first transfer, so /metrics shows it (at 0) from the start and
            # the router's first reading is a baseline that loses nothing.
            sent_bytes_counter()
            self.transfer_sender = transport.sender()
            self.peers: dict[str, Registration] = {}
            self.peer_rejections: dict[str, str] = {}
            self._outbound: dict[int, dict[str, _Outbound]] = {}
            self._concluded: set[int] = set()
            self._queues: list[queue.Queue] = [queue.Queue() for _ in range(self.config.workers)]
            for i, q in enumerate(self._queues):
                self._spawn(self._worker, f"prfaas-send-{i}", q)
            self._spawn(self._prefill_control, "prfaas-prefill-control")
        else:
            rank = int(args.engine_rank)
            self.transfer_receiver = transport.receiver(
                self.config.listen_host,
                rank_port(self.config.listen_port, rank),
                rank_port(self.config.data_port, rank),
            )
            bound_port = int(self.transfer_receiver.endpoint.rsplit(":", 1)[1])
            host = self.config.advertise_host or self.local_ip
            self.transfer_endpoint = f"{host}:{bound_port}"
            self._inbound: dict[int, tuple[str, ReceiveHandle]] = {}
            self._spawn(self._decode_control, "prfaas-decode-control")
            self._threads.append(self._start_heartbeat_checker_thread())

    # -- shared ---------------------------------------------------------------------------------
    def _refuse_unsupported(self) -> None:
        problems = []
        if self.attn_cp_size > 1:
            problems.append(f"attention context parallelism (attn_cp_size={self.attn_cp_size})")
        if self.kv_shard_size > 1:
            problems.append("--enable-kv-cache-sharding")
        if self.dcp_size > 1:
            problems.append(f"decode context parallelism (dcp_size={self.dcp_size})")
        if self.defer_decode_allocation:
            problems.append("--disaggregation-decode-allocation-policy prefill_complete")
        if problems:
            raise PrfaasBackendError("the prfaas transfer backend does not support " + ", ".join(problems))

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _fail_room(self, room: int, reason: str) -> None:
        """Mark a room Failed, keeping the first reason: later ones are symptoms of it."""
        with self.failure_lock:
            self.failure_records.setdefault(room, reason)
        self.update_status(room, KVPoll.Failed)

    def close(self) -> None:
        """Stop this manager's threads and transfer endpoint (tests, process shutdown)."""
        self._stopped.set()
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            for q in self._queues:
                q.put(None)
            with self._room_lock:
                outs = [o for d in self._outbound.values() for o in d.values()]
                self._outbound.clear()
            for o in outs:
                o.handle.abort("prefill manager closed")
            self.transfer_sender.close()
        else:
            self._heartbeat_shutdown.set()
            with self._room_lock:
                handles = [h for _, h in self._inbound.values()]
                self._inbound.clear()
            for h in handles:
                h.abort("decode manager closed")
            self.transfer_receiver.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        # Close every socket of this manager's ZMQ context (control socket, cached PUSH sockets
        # and their monitors) and terminate it now: left to the garbage collector, a context
        # with open sockets blocks the collecting thread forever in ``term()``.
        self._zmq_ctx.destroy(linger=0)

    def teardown(self) -> None:
        """SGLang's role-switch hook (``disaggregation/role_switch.py``): the instance is idle,
        so nothing is in flight; stop threads, transfer endpoint and ZMQ sockets. The KV pools
        belong to the scheduler and are left alone."""
        self.close()
        logger.info("prfaas KV manager torn down (was %s)", self.disaggregation_mode.value)

    def _control_recv(self) -> list[bytes] | None:
        try:
            if self.server_socket.poll(200) == 0:
                return None
            return self.server_socket.recv_multipart()
        except zmq.ZMQError:
            if self._stopped.is_set():
                return None
            raise

    # -- prefill --------------------------------------------------------------------------------
    def _prefill_control(self) -> None:
        while not self._stopped.is_set():
            msg = self._control_recv()
            if not msg:
                continue
            try:
                if msg[0] == REG_TAG:
                    self._on_registration(Registration.from_frames(msg))
                elif msg[0] == META_TAG:
                    self._on_metadata(Metadata.from_frames(msg))
                elif msg[0] == ABORT_TAG:
                    self._on_abort(msg)
                else:
                    logger.warning("prfaas: dropping unknown control message %r", msg[0][:32])
            except WireError as exc:
                logger.warning("prfaas: dropping malformed control message: %s", exc)
            except Exception:  # keep serving other rooms; the failing room times out or fails
                logger.exception("prfaas: error handling a control message")

    def _on_registration(self, reg: Registration) -> None:
        diff = reg.layout.fingerprint().diff(self.layout.fingerprint())
        with self._room_lock:
            self.peers[reg.decode_key] = reg
            if diff:
                self.peer_rejections[reg.decode_key] = (
                    f"prfaas: decode rank {reg.decode_key} lays out its cache differently from "
                    f"this prefill rank ({'; '.join(diff)})"
                )
                logger.error("%s", self.peer_rejections[reg.decode_key])
            else:
                self.peer_rejections.pop(reg.decode_key, None)

    def _on_metadata(self, meta: Metadata) -> None:
        room = meta.room
        host, port = meta.decode_key.rsplit(":", 1)
        dest = _Dest(meta=meta, endpoint=host, dst_port=int(port))
        with self._room_lock:
            infos = self.transfer_infos.setdefault(room, {})
            infos[meta.decode_key] = dest
            complete = len(infos) == meta.required_dst_info_num
            rejection = None if meta.is_dummy else self._peer_problem(meta.decode_key)
        if rejection is not None:
            self.record_failure(room, rejection)
            if room in self.request_status:  # else the sender's first chunk concludes it
                self.update_status(room, KVPoll.Failed)
            self.send_kv_status_message(
                targets=[(dest.endpoint, dest.dst_port)],
                bootstrap_room=room,
                status=KVPoll.Failed,
                failure_reason=rejection,
            )
        if complete:
            self.resolve_kv_replica_factor(infos)
            self.req_to_decode_prefix_len[room] = next(
                (d.meta.decode_prefix_len for d in infos.values() if d.meta.decode_prefix_len is not None),
                0,
            )
            self.update_status(room, KVPoll.WaitingForInput)

    def _peer_problem(self, decode_key: str) -> str | None:
        if decode_key in self.peer_rejections:
            return self.peer_rejections[decode_key]
        if decode_key not in self.peers:
            return f"prfaas: decode rank {decode_key} sent metadata before registering"
        return None

    def _on_abort(self, msg: list[bytes]) -> None:
        note = AbortNotification.from_zmq(msg)
        if note is None:
            return
        status = self.request_status.get(note.room)
        if status is not None and status != KVPoll.Success:
            self._fail_room(note.room, "Aborted by the decode instance")
        self._abort_outbound(note.room, "aborted by decode")

    def add_transfer_request(
        self,
        bootstrap_room: int,
        kv_indices: Any,
        index_slice: slice,
        is_last_chunk: bool,
        aux_index: int | None = None,
        state_indices: list | None = None,
        num_kv_tokens: int | None = None,
        *,
        wait_event: object | None = None,
        indices_event: Any = None,  # a torch.cuda.Event, or None
        trace_ctx: Any = None,
    ) -> None:
        """Called by ``CommonKVSender.send`` on the scheduler thread after each chunk; the
        gather and hand-off run on a worker so the scheduler is not held up."""
        if indices_event is not None:
            indices_event.synchronize()
        chunk = _Chunk(bootstrap_room, kv_indices, index_slice, is_last_chunk, aux_index, state_indices, wait_event)
        if isinstance(self.space, CudaSpace):
            # The worker gathers on its own stream: order it after the forward that wrote
            # these pages, which SGLang enqueued on this (the scheduler's) current stream.
            chunk.ready_event = self.space.record_event()
        # One queue per room keeps a room's chunks in order.
        self._queues[bootstrap_room % len(self._queues)].put(chunk)

    def _worker(self, q: queue.Queue[_Chunk | None]) -> None:
        while True:
            chunk = q.get()
            if chunk is None:
                return
            try:
                self._process(chunk)
            except Exception as exc:
                logger.exception("prfaas: transfer of room %s failed", chunk.room)
                self._abort_outbound(chunk.room, f"prefill error: {exc}")
                self.conclude_failure(bootstrap_room=chunk.room, failure_reason=f"prfaas: {exc}")

    def _process(self, chunk: _Chunk) -> None:
        room = chunk.room
        status = self.request_status.get(room)
        if status is None or status == KVPoll.Failed:
            self._abort_outbound(room, "room failed before its chunk was sent")
            return
        dests = self.transfer_infos.get(room)
        if not dests:
            return
        real = [d for d in dests.values() if not d.is_dummy]
        if not real:  # this rank only pairs as an MLA dummy: nothing to send
            if chunk.is_last:
                self.update_status(room, KVPoll.Success)
            return
        if chunk.wait_event is not None:
            chunk.wait_event.synchronize()
        if chunk.ready_event is not None:
            chunk.ready_event.synchronize()
        kv = _as_indices(chunk.kv_indices)
        for dest in real:
            out = self._outbound_for(room, dest)
            out.add_pages(chunk.index_slice, kv)
            if chunk.is_last:
                out.finish(chunk.state_indices, chunk.aux_index)
        if chunk.is_last:
            self._maybe_conclude(room)

    def _outbound_for(self, room: int, dest: _Dest) -> _Outbound:
        key = dest.meta.decode_key
        with self._room_lock:
            out = self._outbound.get(room, {}).get(key)
            if out is not None:
                return out
            problem = self._peer_problem(key)
            if problem is not None:
                raise PrfaasBackendError(problem)
            endpoint = self.peers[key].transfer_endpoint
        out = _Outbound(self, room, dest, endpoint)
        with self._room_lock:
            self._outbound.setdefault(room, {})[key] = out
        if self.request_status.get(room, KVPoll.Failed) == KVPoll.Failed:
            out.handle.abort("request failed while its session opened")
        out.handle.done.add_done_callback(functools.partial(self._outbound_done, room, key))
        return out

    def _outbound_done(self, room: int, key: str, fut: Any) -> None:
        exc = fut.exception()
        with self._room_lock:
            out = self._outbound.get(room, {}).get(key)
            if out is not None:
                out.release()
        if exc is None:
            self._maybe_conclude(room)
            return
        dest = out.dest if out is not None else None
        where = f" to {self.peers[key].transfer_endpoint}" if key in self.peers else ""
        self.conclude_failure(
            bootstrap_room=room,
            failure_reason=f"prfaas transfer{where} failed: {type(exc).__name__}: {exc}",
            targets=None if dest is None else [(dest.endpoint, dest.dst_port)],
        )

    def _maybe_conclude(self, room: int) -> None:
        """Success once every real destination's session was fully handed over (``finish``)
        and confirmed by its receiver; called from both events since either can come last."""
        sent = 0
        with self._room_lock:
            outs = self._outbound.get(room, {})
            n_real = sum(1 for d in self.transfer_infos.get(room, {}).values() if not d.is_dummy)
            ready = (
                n_real > 0
                and len(outs) == n_real
                and all(
                    o.finished and o.handle.done.done() and o.handle.done.exception() is None for o in outs.values()
                )
                and room not in self._concluded
            )
            if ready:
                self._concluded.add(room)
                sent = sum(int(o.handle.progress().get("bytes_confirmed", 0)) for o in outs.values())
        if ready:
            record_sent(sent)  # before Success is visible: what the router reads as this egress
            self.conclude_transfer(bootstrap_room=room, status=KVPoll.Success)

    def _abort_outbound(self, room: int, reason: str) -> None:
        with self._room_lock:
            outs = list(self._outbound.get(room, {}).values())
        for o in outs:
            if not o.handle.done.done():
                o.handle.abort(reason)

    def abort_prefill_room(self, room: int, reason: str) -> None:
        """Stop sending a room and tell its decode ranks now, rather than let them wait for
        SGLang's transfer timeout."""
        self._abort_outbound(room, reason)
        self.send_kv_status_message(
            targets=self._room_notify_targets(room),
            bootstrap_room=room,
            status=KVPoll.Failed,
            failure_reason=reason,
        )

    def forget_room(self, room: int) -> None:
        """Drop a prefill room's sessions once SGLang cleared its sender."""
        self._abort_outbound(room, "request cleared by prefill")
        with self._room_lock:
            self._concluded.discard(room)
            for o in self._outbound.pop(room, {}).values():
                o.release()

    # -- decode ---------------------------------------------------------------------------------
    def build_receiver_registration_message(self) -> list[bytes]:
        return Registration(
            decode_key=f"{self.local_ip}:{self.rank_port}",
            transfer_endpoint=self.transfer_endpoint,
            layout=self.layout,
            engine_rank=int(self.kv_args.engine_rank),
        ).to_frames()

    def _decode_control(self) -> None:
        while not self._stopped.is_set():
            msg = self._control_recv()
            if not msg:
                continue
            try:
                if msg[0] == ABORT_ACK_TAG:
                    self.handle_abort_ack_message(msg)
                    continue
                parsed = self.parse_kv_status_message(msg)
                if parsed is None:
                    continue
                room, status, prefill_rank, reason = parsed
                if status == KVPoll.Failed:
                    if room in self.request_status:
                        self._fail_room(room, reason or self.DEFAULT_PREFILL_FAILURE_REASON)
                    self.drop_inbound(room, "prefill reported the transfer failed")
                # Success is taken from our own receive handle only: it resolves once every
                # byte is in place, which prefill's message cannot promise.
            except Exception:
                logger.exception("prfaas: error handling a status message")

    def expect_room(
        self,
        room: int,
        kv_indices: np.ndarray,
        aux_index: int | None,
        state_indices: list[Any] | None,
    ) -> tuple[str, str]:
        session_id = f"sglang.{room}.{secrets.token_hex(6)}"
        token = secrets.token_urlsafe(24)
        sink = _RoomSink(self, kv_indices, aux_index, state_indices)
        handle = self.transfer_receiver.expect(
            session_id, token, self.layout.fingerprint(), sink, self.config.deadline_s
        )
        with self._room_lock:
            old = self._inbound.pop(room, None)
            self._inbound[room] = (session_id, handle)
        if old is not None:
            old[1].abort("superseded by a new request with the same bootstrap room")
        handle.done.add_done_callback(lambda fut: self._inbound_done(room, session_id, fut))
        return session_id, token

    def _inbound_done(self, room: int, session_id: str, fut: Any) -> None:
        with self._room_lock:
            current = self._inbound.get(room)
            if current is None or current[0] != session_id:
                return  # cleared or superseded
        exc = fut.exception()
        if room not in self.request_status:
            return
        if exc is None:
            self.update_status(room, KVPoll.Success)
        else:
            self._fail_room(room, f"prfaas transfer failed: {type(exc).__name__}: {exc}")

    def drop_inbound(self, room: int, reason: str) -> None:
        with self._room_lock:
            entry = self._inbound.pop(room, None)
        if entry is not None and not entry[1].done.done():
            entry[1].abort(reason)

    def _handle_node_failure(self, failed_bootstrap_addr: str) -> None:
        super()._handle_node_failure(failed_bootstrap_addr)
        with self._room_lock:
            rooms = list(self._inbound)
        for room in rooms:
            if self.request_status.get(room) == KVPoll.Failed:
                self.drop_inbound(room, f"prefill {failed_bootstrap_addr} is unreachable")


@dataclasses.dataclass(frozen=True)
class _Landing:
    """An item that landed in a staging view (the destination is not host-addressable)."""

    region: Region
    indices: np.ndarray
    view: memoryview
    space: MemorySpace


class _RoomSink(StagedSink[_Landing]):
    """Decode side of one request: where each item the prefill announces lands."""

    def __init__(
        self,
        mgr: PrfaasKVManager,
        kv_indices: np.ndarray,
        aux_index: int | None,
        state_indices: list[Any] | None,
    ) -> None:
        super().__init__()
        self.mgr = mgr
        self.kv = _as_indices(kv_indices)
        self.aux_index = aux_index
        self.states = [None if s is None else _as_indices(s) for s in (state_indices or [])]

    def _target(self, item: ItemSpec, ref: ItemRef) -> tuple[Region, np.ndarray, MemorySpace]:
        m = self.mgr
        if ref.kind == "kv":
            if ref.a >= len(m.kv_regions) or ref.count <= 0 or ref.b + ref.count > self.kv.size:
                raise ValueError(f"{item.name}: outside the request's {self.kv.size} pages")
            return m.kv_regions[ref.a], self.kv[ref.b : ref.b + ref.count], m.space
        if ref.kind == "st":
            if ref.a >= len(m.state_regions) or ref.b >= len(m.state_regions[ref.a]):
                raise ValueError(f"{item.name}: no such state component/tensor")
            idx = self.states[ref.a] if ref.a < len(self.states) else None
            if idx is None:
                raise ValueError(f"{item.name}: decode expects no data for this component")
            return m.state_regions[ref.a][ref.b], idx, m.space
        if ref.a >= len(m.aux_regions) or self.aux_index is None:
            raise ValueError(f"{item.name}: no such metadata buffer")
        return m.aux_regions[ref.a], np.array([self.aux_index], dtype=np.int64), m.host

    def land(self, item: ItemSpec) -> tuple[memoryview, _Landing | None]:
        region, idx, space = self._target(item, parse_item_name(item.name))
        if item.nbytes != idx.size * region.item_len:
            raise ValueError(
                f"{item.name}: {item.nbytes} bytes announced, destination holds {idx.size} x {region.item_len}"
            )
        view, in_place = space.landing(region, idx)
        return view, None if in_place else _Landing(region, idx, view, space)

    def commit(self, item: ItemSpec, staged: _Landing) -> None:
        staged.space.scatter(staged.region, staged.indices, staged.view)


class PrfaasKVSender(CommonKVSender):
    """Prefill side of one request. Polling, timeouts and failure reporting are SGLang's."""

    kv_mgr: PrfaasKVManager

    def abort(self) -> None:
        super().abort()
        self.kv_mgr.abort_prefill_room(self.bootstrap_room, "Aborted by the prefill instance")

    def clear(self) -> None:
        super().clear()
        self.kv_mgr.forget_room(self.bootstrap_room)


class PrfaasKVReceiver(CommonKVReceiver):
    """Decode side of one request: announces the session, then tells prefill where to push."""

    kv_mgr: PrfaasKVManager
    conclude_state: Any  # a KVPoll value, set by CommonKVReceiver

    def init(self, prefill_dp_rank: int) -> None:
        super().init(prefill_dp_rank)
        if self.conclude_state == KVPoll.Failed or not getattr(self, "bootstrap_infos", None):
            return
        real = [i for i in self.bootstrap_infos if not i.get("is_dummy")]
        if len(real) != 1:
            info = self.prefill_info
            self.kv_mgr._fail_room(
                self.bootstrap_room,
                "prfaas backend needs exactly one sending prefill rank per decode rank, got "
                f"{len(real)} (prefill attn_tp={info.attn_tp_size} pp={info.pp_size}, decode "
                f"attn_tp={self.kv_mgr.attn_tp_size} pp={self.kv_mgr.pp_size}; use equal TP/PP, "
                "or an MLA model for different TP)",
            )
            self.conclude_state = KVPoll.Failed

    def send_metadata(
        self,
        kv_indices: Any,
        aux_index: int | None = None,
        state_indices: list | None = None,
        decode_prefix_len: int | None = None,
        destination: KVTransferDestination = KVTransferDestination.DEVICE,
        device_kv_indices: Any = None,
    ) -> None:
        if self.conclude_state == KVPoll.Failed:
            return
        if getattr(self, "bootstrap_infos", None) is None:
            self.kv_mgr._fail_room(
                self.bootstrap_room,
                f"Could not fetch prefill parallel info from bootstrap_addr: {self.bootstrap_addr}",
            )
            return
        if destination != KVTransferDestination.DEVICE or device_kv_indices is not None:
            raise NotImplementedError("the prfaas backend writes device KV destinations only")
        kv = np.asarray(_as_indices(kv_indices), dtype=np.int32)
        states = tuple(None if s is None else np.asarray(_as_indices(s), dtype=np.int32) for s in (state_indices or []))
        session_id, token = self.kv_mgr.expect_room(self.bootstrap_room, kv, aux_index, list(states))
        decode_key = f"{self.kv_mgr.local_ip}:{self.kv_mgr.rank_port}"
        for info in self.bootstrap_infos:
            dummy = bool(info.get("is_dummy"))
            meta = Metadata(
                room=self.bootstrap_room,
                decode_key=decode_key,
                required_dst_info_num=self.required_dst_info_num,
                is_dummy=dummy,
                session_id="" if dummy else session_id,
                token="" if dummy else token,
                aux_index=None if dummy else aux_index,
                decode_prefix_len=decode_prefix_len,
                kv_indices=np.empty(0, np.int32) if dummy else kv,
                state_indices=() if dummy else states,
            )
            if not self._send_bootstrap_message(
                bootstrap_info=info, message=meta.to_frames(), operation="send_metadata"
            ):
                self.invalidate_cached_bootstrap_infos()
                self.kv_mgr.drop_inbound(self.bootstrap_room, "metadata could not reach prefill")
                return
        self.init_time = time.time()

    def abort(self) -> None:
        super().abort()
        self.kv_mgr.drop_inbound(self.bootstrap_room, "aborted by decode")

    def clear(self) -> None:
        super().clear()
        self.kv_mgr.drop_inbound(self.bootstrap_room, "request cleared by decode")


class PrfaasKVBootstrapServer(CommonKVBootstrapServer):
    """SGLang's own bootstrap registry, unchanged. Subclassing (rather than a server of our
    own) keeps SGLang's Rust-server mode able to serve the registry in its place."""
