"""Worker half of the connector (runs where the KV cache tensors live).

Producer: each attention layer is packed and pushed as its ``save_kv_layer`` fires; groups whose
layers have no hook (Mamba/GDN) are pushed from the registered tensors in ``wait_for_save``, when
the step's forward is over and their state is final. Under chunked prefill the session opens at
the first chunk and each chunk's full-attention blocks go as that chunk's layer is written;
sliding-window tails and recurrent states go with the last chunk. Source buffers live until the receiver
confirms (``done``), and the request's blocks stay held by ``delay_free`` until then; the
transfer deadline is the lease, so a vanished receiver releases them.
Consumer: announces each load to the receiver with a sink that scatters every landed item into
the request's blocks; reports completion or failure through ``get_transfer_results``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from prfaas_plugin.engines.vllm import hetero, layout, packing, tp
from prfaas_plugin.engines.vllm.meta import PrfaaSMetadata, Transfer
from prfaas_plugin.engines.vllm.options import Options
from prfaas_plugin.engines.vllm.stats import PrfaaSConnectorStats
from prfaas_plugin.kernels.device import Lease, Staged
from prfaas_plugin.transfer import (
    ItemSpec,
    ReceiveHandle,
    SendHandle,
    TransferError,
    TransferManifest,
    TransferReceiver,
    TransferSender,
    affinity,
)
from prfaas_plugin.transfer.binding import (
    EndpointSpec,
    EngineTransport,
    StagedSink,
    TransportFactory,
    join_hostport,
    rank_port,
)

log = logging.getLogger("vllm.prfaas")  # child of vLLM's logger: same handlers and format


class _Sink(StagedSink[torch.Tensor | Lease]):
    """Receives one request's items into staging buffers, then scatters each into its blocks.
    With ``pair`` (prefill and decode TP differ) an item is this session's rows of a layer part,
    scattered into those rows of the local part."""

    def __init__(self, w: WorkerSide, t: Transfer, pair: hetero.Pair | None = None) -> None:
        super().__init__()
        self.w, self.t, self.pair = w, t, pair
        self.landed: list[Any] = []  # host buffers or pinned leases handed to the receiver
        self.pending: list[Staged] = []  # scatters issued (on a side stream for CUDA caches)

    def _block_bytes(self, lname: str, part: int) -> int:
        cache, bdim = self.w.part(lname, part)
        if self.pair is None:
            return packing.block_bytes(cache, bdim)
        r = self.pair.routes.get((lname, part))
        if r is None:
            raise ValueError(f"{lname}[{part}] is not carried by prefill rank {self.pair.p} to this rank")
        return r.block_bytes

    def land(self, item: ItemSpec) -> tuple[memoryview, torch.Tensor | Lease]:
        g, first, count, part, lname = layout.parse_item_name(item.name)
        if count * self._block_bytes(lname, part) != item.nbytes or g >= len(self.t.block_ids):
            raise ValueError(f"item {item.name}: {item.nbytes} bytes does not fit the local layout")
        view, landed = self.w.packer.landing(self.w.part(lname, part)[0], item.nbytes)
        self.landed.append(landed)
        return view, landed

    def _held_blocks(self, g: int, first: int, count: int) -> int:
        """Leading blocks of an item that this instance's prefix cache already filled: they are
        neither sent (skip_bytes) nor written (commit). A recurrent state is never held: it
        is the state after the whole prompt."""
        grp = self.w.groups[g]
        if grp.kind == "state":
            return 0
        return max(0, min(count, self.t.num_local_tokens // grp.block_size - first))

    def skip_bytes(self, item: ItemSpec) -> int:
        g, first, count, part, lname = layout.parse_item_name(item.name)
        if self.w.part(lname, part)[1] != 0:
            # [2, blocks, ...] (K and V apart) packs as [2, n, row]: the held blocks are not one
            # leading byte range, so the whole item comes and commit skips them in each half
            return 0
        return self._held_blocks(g, first, count) * self._block_bytes(lname, part)

    def commit(self, item: ItemSpec, staged: torch.Tensor | Lease) -> None:
        g, first, count, part, lname = layout.parse_item_name(item.name)
        cache, bdim = self.w.part(lname, part)
        ids = self.t.block_ids[g][first : first + count]
        skip = self._held_blocks(g, first, count)
        r = self.pair.routes[(lname, part)] if self.pair is not None else None
        rows = None if r is None or r.split.replicated else (r.split.dim, tp.scatter_spec(r.slices))
        self.pending.append(self.w.packer.unpack(cache, bdim, ids, staged, skip, rows))

    def settled(self) -> bool:
        """True once every scatter has reached the cache (an event query for CUDA caches, never
        a device-wide synchronize); the staging goes back to the pool then."""
        if not all(p.ready() for p in self.pending):
            return False
        self.close()
        return True

    def close(self) -> None:
        """Give every staging buffer back, after the copies still reading one are done."""
        for p in self.pending:
            p.wait()
        for landed in self.landed:
            if hasattr(landed, "release"):
                landed.release()
        self.pending, self.landed = [], []


def _all_of(futs: list[Future[Any]], on_error: Any = None) -> Future[list[Any]]:
    """Resolves with every result once all resolved, or with the first error at once (then
    ``on_error(exc)`` runs, e.g. aborting the other sessions of the same request)."""
    out: Future[list[Any]] = Future()
    lock, left = threading.Lock(), [len(futs)]

    def one(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            if out.done():
                return
            exc = next((f.exception() for f in futs if f.done() and f.exception() is not None), None)
            if exc is not None:
                out.set_exception(exc)
            elif not left[0]:
                out.set_result([f.result() for f in futs])
            else:
                return
        if exc is not None and on_error is not None:
            on_error(exc)

    for f in futs:
        f.add_done_callback(one)
    return out


@dataclass
class _Leg:
    """One session of a producer transfer: to the decode rank of the same TP rank (``pair``
    None, every part whole) or, when TP sizes differ, to one decode rank this rank feeds."""

    handle: SendHandle
    pair: hetero.Pair | None = None


@dataclass
class _Send:
    """A producer transfer in flight: its sessions, the items already sent, and the packed
    buffers the sessions read from (kept until every ``done``)."""

    legs: list[_Leg]
    transfer: Transfer  # the latest step's (its block list covers every chunk so far)
    plan: dict[int, list[tuple[int, int]]]  # block ranges of each group's items (``_plan``)
    sent: set[tuple[str, int, int]] = field(default_factory=set)  # (layer, group, first block)
    buffers: list[Staged] = field(default_factory=list)
    final: bool = False  # the last chunk's step ran: every item was sent
    streamed: int = 0  # items sent in steps before the last chunk's (chunked prefill)
    failed: bool = False  # a session failed: nothing more is sent


@dataclass
class _Load:
    """A consumer load announced to the receiver (``started``: monotonic seconds)."""

    done: Future[list[TransferManifest]]
    transfer: Transfer
    started: float
    handles: list[ReceiveHandle] = field(default_factory=list)  # empty when it failed before a receiver
    sinks: list[_Sink] = field(default_factory=list)
    landed: float | None = None  # monotonic seconds when its last session finished (ok or not)
    abandoned: bool = False  # its request finished (aborted) before the KV arrived

    def __post_init__(self) -> None:
        self.done.add_done_callback(lambda _f: setattr(self, "landed", time.monotonic()))


class WorkerSide:
    #: Builds the transfer endpoints from the options; tests inject another implementation of the
    #: transfer contract (the loopback fabric, a fault proxy).
    transport_factory: ClassVar[TransportFactory[EndpointSpec]] = staticmethod(EngineTransport)

    def __init__(self, vllm_config: Any, kv_cache_config: Any, opts: Options, producer: bool, consumer: bool) -> None:
        self.cfg, self.opts = vllm_config, opts
        self.kv_cache_config = kv_cache_config
        self.groups = layout.groups_of(kv_cache_config)
        self.group_of = {n: g.index for g in self.groups for n in g.layer_names}
        self.producer, self.consumer = producer, consumer
        self.parts: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.fp: Any = None
        self.tp_rank = 0
        #: set only when this instance's TP size differs from its peers' (``peer_tp_size``)
        self.send_pairs: list[hetero.Pair] | None = None
        self.recv_pairs: list[hetero.Pair] | None = None
        self.receiver: TransferReceiver | None = None
        self.sender: TransferSender | None = None
        self.meta = PrfaaSMetadata()
        self._sends: dict[str, _Send] = {}
        self._send_futs: dict[str, Future[Any]] = {}
        self._loads: dict[str, _Load] = {}
        self._sched_finished: set[str] = set()
        #: Producers whose last chunk was scheduled: vLLM holds their blocks until they are
        #: reported in finished_sending (the scheduler's request_finished delays the free). Any
        #: other producer's blocks are freed at once, so it must never be reported.
        self._final_sends: set[str] = set()
        self._load_errors: set[int] = set()
        self._lock = threading.Lock()
        self.stats = PrfaaSConnectorStats()
        #: the one pack/unpack engine (kernels/) and, for CUDA caches, pinned staging and side streams
        self.packer = packing.Packer(opts.staging_pool_mb << 20)
        self._stage_exec: ThreadPoolExecutor | None = None  # sends device-staged items once copied

    # -- setup ---------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        nb = self.kv_cache_config.num_blocks
        for name, t in kv_caches.items():
            tensors = list(t) if isinstance(t, (list, tuple)) else [t]
            parts = []
            for x in tensors:
                bdim = 0 if x.shape[0] == nb else 1
                if x.shape[bdim] != nb:
                    raise ValueError(f"prfaas: cannot find the block dim of {name} {tuple(x.shape)} (num_blocks {nb})")
                parts.append((x, bdim))
            self.parts[name] = parts
        pc = self.cfg.parallel_config
        shapes = {
            n: [(str(x.dtype), tuple(s for i, s in enumerate(x.shape) if i != b)) for x, b in ps]
            for n, ps in self.parts.items()
        }
        self.fp = layout.fingerprint(
            self.groups,
            shapes,
            tp_rank=getattr(pc, "rank", 0) % max(1, pc.tensor_parallel_size),
            tp_size=pc.tensor_parallel_size,
            model=self.opts.model_id or self.cfg.model_config.model.rstrip("/").rsplit("/", 1)[-1],
            dtype=str(self.cfg.cache_config.cache_dtype),
        )
        self.tp_rank = rank = int(self.fp.fields["tp_rank"])
        peer_tp = self.opts.peer_tp_size or pc.tensor_parallel_size
        if peer_tp != pc.tensor_parallel_size:
            self._pair_up(pc.tensor_parallel_size, peer_tp, rank)
        spec = self.opts.endpoint_spec(self.cfg.kv_transfer_config.engine_id)
        try:  # in the worker process, where the engine reads the files: fail at startup, not per request
            spec.tls.check(server=self.consumer)
        except ValueError as e:
            raise ValueError(f"prfaas kv_connector_extra_config: {e}") from None
        transport = type(self).transport_factory(spec)
        # threads started here (gRPC's, the receiver's) take the transfer CPUs, not this
        # thread's OpenMP pinning (transfer/affinity.py); this thread keeps its mask
        with affinity.transfer_cpus_while():
            if self.consumer:
                host, _, port = self.opts.listen.rpartition(":")
                advertise = None
                if self.opts.advertise_data:
                    a_host, _, a_port = self.opts.advertise_data.rpartition(":")
                    advertise = join_hostport(a_host.strip("[]"), rank_port(int(a_port), rank))
                self.receiver = transport.receiver(
                    host.strip("[]"), rank_port(int(port), rank), rank_port(self.opts.data_port, rank), advertise
                )
                log.info(
                    "prfaas: receiver listening on %s (data plane %s%s%s)",
                    self.receiver.endpoint,
                    getattr(self.receiver, "bound_data_endpoint", "n/a"),
                    f", advertised as {advertise}" if advertise else "",
                    ", TLS" if self.opts.tls_cert or self.opts.tls_ca else "",
                )
            if self.producer:
                self.sender = transport.sender()
        cpus = affinity.transfer_cpus()
        if cpus is not None:
            log.info(
                "prfaas: transfer threads run on CPUs %s (the worker thread: %s)",
                sorted(cpus),
                sorted(os.sched_getaffinity(0)),
            )

    def _pair_up(self, own_tp: int, peer_tp: int, rank: int) -> None:
        """Sessions of this rank when its peers run another TP size (refused, naming both sizes,
        unless one divides the other or when a part has no split rule)."""
        if self.producer:
            tp.check_tp_pair(own_tp, peer_tp)
        if self.consumer:
            tp.check_tp_pair(peer_tp, own_tp)
        splits = hetero.part_splits(self.kv_cache_config, self.cfg.model_config, self.parts, own_tp)
        base = {
            k: v for k, v in self.fp.fields.items() if k not in ("tp_size", "tp_rank") and not k.startswith("layer:")
        }
        if self.producer:
            self.send_pairs = hetero.pairs(self.groups, self.parts, splits, own_tp, peer_tp, rank, True, base)
            log.info(
                "prfaas: prefill TP %d rank %d feeds decode TP %d ranks %s",
                own_tp,
                rank,
                peer_tp,
                [p.d for p in self.send_pairs],
            )
        if self.consumer:
            self.recv_pairs = hetero.pairs(self.groups, self.parts, splits, peer_tp, own_tp, rank, False, base)
            log.info(
                "prfaas: decode TP %d rank %d is fed by prefill TP %d ranks %s",
                own_tp,
                rank,
                peer_tp,
                [p.p for p in self.recv_pairs],
            )

    def part(self, layer: str, i: int) -> tuple[torch.Tensor, int]:
        try:
            return self.parts[layer][i]
        except (KeyError, IndexError):
            raise ValueError(f"unknown layer part {layer}[{i}]") from None

    # -- producer ------------------------------------------------------------------------------
    def _plan(self, t: Transfer) -> dict[int, list[tuple[int, int]]]:
        """Block ranges ``[first, end)`` of each group's items, fixed when the transfer opens.

        Full attention is cut into ``t.slice_tokens`` pieces (whole blocks) when chunked prefill
        streams it, so a chunk's blocks can go before the prompt's last chunk ran. Sliding-window
        tails and recurrent states go once final; when the transfer opens before that (at the
        first chunk), their range is derived from the block count the request will hold then."""
        out: dict[int, list[tuple[int, int]]] = {}
        for g in self.groups:
            held = len(t.block_ids[g.index]) if t.final else layout.cdiv(t.num_tokens, g.block_size)
            first, end = layout.block_range(g, t.num_tokens, held)
            step = t.slice_tokens // g.block_size if g.kind == "full" else 0
            if step <= 0:
                out[g.index] = [(first, end)]
            else:
                out[g.index] = [(b, min(b + step, end)) for b in range(first, end, step)]
        return out

    def _items(
        self, t: Transfer, pair: hetero.Pair | None = None, plan: dict[int, list[tuple[int, int]]] | None = None
    ) -> list[ItemSpec]:
        plan = self._plan(t) if plan is None else plan
        items = []
        order = 0
        for g in self.groups:
            for first, end in plan[g.index]:
                for lname in g.layer_names:
                    for pi, (x, bdim) in enumerate(self.parts.get(lname, ())):
                        if pair is None:
                            nbytes = packing.block_bytes(x, bdim)
                        elif (lname, pi) in pair.routes:
                            nbytes = pair.routes[(lname, pi)].block_bytes
                        else:
                            continue
                        items.append(
                            ItemSpec(
                                layout.item_name(g.index, first, end - first, lname, pi), (end - first) * nbytes, order
                            )
                        )
                        order += 1
        return items

    @staticmethod
    def _rank_endpoint(endpoint: str, rank: int) -> str:
        """The receiver of decode rank ``rank`` when ``endpoint`` is rank 0's (port + rank)."""
        host, _, port = endpoint.rpartition(":")
        return join_hostport(host.strip("[]"), rank_port(int(port), rank))

    def _open(self, t: Transfer) -> None:
        if t.req_id in self._sends:
            self._sends[t.req_id].transfer = t  # this step's block list (chunks add blocks)
            return
        if t.req_id in self._send_futs:
            return
        legs: list[_Leg] = []
        try:
            assert self.sender is not None, "a kv_consumer-only instance cannot produce"
            plan = self._plan(t)
            if self.send_pairs is None:
                manifest = TransferManifest(t.transfer_id, tuple(self._items(t, None, plan)), self.fp, sender_id="vllm")
                ep = self._rank_endpoint(t.endpoint, self.tp_rank)
                legs.append(_Leg(self.sender.open(ep, manifest, t.token, deadline_s=t.deadline_s)))
            for pr in self.send_pairs or ():
                manifest = TransferManifest(
                    pr.session_id(t.transfer_id), tuple(self._items(t, pr, plan)), pr.fingerprint, sender_id="vllm"
                )
                ep = self._rank_endpoint(t.endpoint, pr.d)
                legs.append(_Leg(self.sender.open(ep, manifest, t.token, deadline_s=t.deadline_s), pr))
            self._sends[t.req_id] = _Send(legs, t, plan)
        except Exception as e:  # never pin blocks: report the request as done (failed) at once
            for leg in legs:
                leg.handle.abort(f"another session of the transfer failed to open: {e}")
            log.error("prfaas: cannot open transfer %s for %s: %s", t.transfer_id, t.req_id, e)
            self.stats.record_send_failure(type(e).__name__)
            f: Future[None] = Future()
            f.set_exception(e)
            self._send_futs[t.req_id] = f

    def _fail_send(self, st: _Send, reason: str, except_leg: _Leg | None = None) -> None:
        """Stop sending a transfer's items and abort its (other) sessions."""
        st.failed = True
        for leg in st.legs:
            if leg is not except_leg:
                leg.handle.abort(reason)

    def _ready(self, st: _Send, g: layout.GroupInfo, first: int, end: int) -> bool:
        """Whether blocks ``[first, end)`` of group ``g`` hold final KV after this step."""
        t = st.transfer
        if t.final:
            if g.kind != "full" and (first, end) != layout.block_range(g, t.num_tokens, len(t.block_ids[g.index])):
                # the request holds another block count than predicted when the transfer opened
                self._fail_send(st, f"{layout.item_name(g.index, first, end - first, '*', 0)} no longer matches")
                return False
            return True
        return g.kind == "full" and end * g.block_size <= (t.ready_tokens or 0)

    def _send_layer(self, rid: str, lname: str) -> None:
        st = self._sends[rid]
        if st.failed or lname not in self.group_of:
            return
        t, keep = st.transfer, st.buffers
        g = self.groups[self.group_of[lname]]
        for first, end in st.plan[g.index]:
            key = (lname, g.index, first)
            if key in st.sent or not self._ready(st, g, first, end):
                continue
            st.sent.add(key)
            st.streamed += not t.final
            ids = t.block_ids[g.index][first:end]
            for pi, (x, bdim) in enumerate(self.parts[lname]):
                legs = [lg for lg in st.legs if lg.pair is None or (lname, pi) in lg.pair.routes]
                if not legs:
                    continue  # a replicated part another prefill rank sends
                whole: Staged | None = None
                for leg in legs:
                    r = leg.pair.routes[(lname, pi)] if leg.pair is not None else None
                    if r is None or r.whole:
                        if whole is None:
                            whole = self.packer.stage_send(x, bdim, ids)
                            keep.append(whole)
                        data = whole
                    else:
                        data = self.packer.stage_send(x, bdim, ids, (r.split.dim, tp.gather_spec(r.slices)))
                        keep.append(data)
                    item = layout.item_name(g.index, first, end - first, lname, pi)
                    if not self._push(st, leg, lname, item, data):
                        return

    def _push(self, st: _Send, leg: _Leg, lname: str, item: str, data: Staged) -> bool:
        """Send a staged item now if its bytes are on the host (CPU caches), else from the
        staging thread once its device-to-host copy is done: the forward thread never waits
        for a copy. False when the transfer failed (its other layers are not sent)."""
        if data.ready():
            return self._send(st, leg, lname, item, data.host)
        if self._stage_exec is None:
            self._stage_exec = ThreadPoolExecutor(
                1, thread_name_prefix="prfaas-stage", initializer=affinity.use_transfer_cpus
            )

        def later() -> None:
            data.wait()
            if not st.failed and not leg.handle.done.done():
                self._send(st, leg, lname, item, data.host)

        self._stage_exec.submit(later)
        return True

    def _send(self, st: _Send, leg: _Leg, lname: str, item: str, data: torch.Tensor) -> bool:
        try:
            leg.handle.send(item, data)
            return True
        except TransferError as e:  # one line per transfer: stop sending its other layers
            log.warning("prfaas: transfer %s failed while sending %s: %s", st.transfer.transfer_id, lname, e)
            self._fail_send(st, f"another session of the transfer failed: {e}", leg)
            return False

    def save_kv_layer(self, layer_name: str) -> None:
        """This step's KV of ``layer_name`` is written: send what it finished (every chunk's
        full-attention blocks; the sliding-window tail with the last chunk)."""
        for t in self.meta.sends:
            self._open(t)
            if t.req_id in self._sends:
                self._send_layer(t.req_id, layer_name)

    def wait_for_save(self) -> None:
        for t in self.meta.sends:  # layers without hooks (recurrent state) are final now
            self._open(t)
            if t.req_id in self._sends:
                for lname in self.group_of:
                    self._send_layer(t.req_id, lname)
                st = self._sends[t.req_id]
                if t.final and not st.final:
                    st.final = True
                    if st.streamed:
                        log.info(
                            "prfaas: transfer %s: %d of %d layer items streamed before the last chunk",
                            t.transfer_id,
                            st.streamed,
                            len(st.sent),
                        )

    # -- consumer ------------------------------------------------------------------------------
    def start_load_kv(self) -> None:
        for t in self.meta.loads:
            if self.receiver is None:
                log.error("prfaas: request %s asks for a load but this instance is not a consumer", t.req_id)
                f: Future[list[TransferManifest]] = Future()
                f.set_exception(RuntimeError("not a kv_consumer"))
                self._loads[t.req_id] = _Load(f, t, time.monotonic())
                continue
            hs: list[ReceiveHandle] = []
            try:
                if self.recv_pairs is None:
                    sinks = [_Sink(self, t)]
                    hs.append(self.receiver.expect(t.transfer_id, t.token, self.fp, sinks[0], deadline_s=t.deadline_s))
                else:
                    sinks = [_Sink(self, t, pr) for pr in self.recv_pairs]
                    for pr, sink in zip(self.recv_pairs, sinks):
                        hs.append(
                            self.receiver.expect(
                                pr.session_id(t.transfer_id), t.token, pr.fingerprint, sink, deadline_s=t.deadline_s
                            )
                        )
            except Exception as e:  # e.g. a transfer_id another request still uses: this request only
                for h in hs:
                    h.abort(f"another session of the load could not be announced: {e}")
                log.error("prfaas: cannot announce the load of %s for %s: %s", t.transfer_id, t.req_id, e)
                failed_load: Future[list[TransferManifest]] = Future()
                failed_load.set_exception(e)
                self._loads[t.req_id] = _Load(failed_load, t, time.monotonic())
                continue

            def abort_rest(exc: BaseException, hs: list[ReceiveHandle] = hs) -> None:
                for h in hs:
                    if not h.done.done():
                        h.abort(f"another session of the load failed: {exc}")

            self._loads[t.req_id] = _Load(_all_of([h.done for h in hs], abort_rest), t, time.monotonic(), hs, sinks)
        for rid in self.meta.aborts:  # decode-initiated offloads whose remote prefill failed
            ld = self._loads.get(rid)
            for h in ld.handles if ld is not None else ():
                if not h.done.done():
                    h.abort("the offloaded prefill failed; prefilling locally")

    # -- completion ----------------------------------------------------------------------------
    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        self._final_sends.update(t.req_id for t in self.meta.sends if t.final)
        self._sched_finished |= set(finished_req_ids)
        sending: set[str] = set()
        for rid in finished_req_ids - self._final_sends:
            # Finished before its last chunk (aborted mid chunked prefill), or never a producer:
            # vLLM freed its blocks already, so it is dropped here and never reported.
            st = self._sends.pop(rid, None)
            if st is not None:
                self._fail_send(st, "request finished before its prefill completed")
                self._release_staging(st)
            self._send_futs.pop(rid, None)
            self._sched_finished.discard(rid)
        for rid in finished_req_ids & self._loads.keys():
            ld = self._loads[rid]
            ld.abandoned = True  # aborted while its KV was due: vLLM waits for the load's report
            for h in ld.handles:
                if not h.done.done():
                    h.abort("the request finished before its KV arrived")
        for rid in list(self._sends):
            legs = self._sends[rid].legs
            if all(lg.handle.done.done() for lg in legs):
                exc = next((e for lg in legs if (e := lg.handle.done.exception()) is not None), None)
                f = legs[0].handle.done if len(legs) == 1 else _all_of([lg.handle.done for lg in legs])
                self._send_futs[rid] = f
                self._release_staging(self._sends.pop(rid))  # the receiver has them
                if exc is None:  # what crossed: less than the manifest when D held a prefix
                    self.stats.record_sent(sum(lg.handle.progress().get("bytes_confirmed", 0) for lg in legs))
                else:
                    self.stats.record_send_failure(type(exc).__name__)
        for rid in list(self._send_futs):
            if rid in self._sched_finished:
                f = self._send_futs.pop(rid)
                self._sched_finished.discard(rid)
                self._final_sends.discard(rid)
                if f.exception() is not None:
                    log.warning("prfaas: producer transfer for %s ended with %s; blocks freed", rid, f.exception())
                sending.add(rid)
        recving, failed = set(), set()
        for rid in list(self._loads):
            ld = self._loads[rid]
            t = ld.transfer
            if not ld.done.done():
                continue
            err = ld.done.exception()
            if err is None and not all(s.settled() for s in ld.sinks):
                continue  # bytes landed, scatters still running on the side stream
            for s in ld.sinks:
                s.close()
            del self._loads[rid]
            recving.add(rid)
            if err is None:
                ms = ld.done.result()
                p = {"bytes_received": 0, "bytes_skipped": 0}
                for h in ld.handles:
                    for k, v in h.progress().items():
                        if k in p:
                            p[k] += v
                now = time.monotonic()
                self.stats.record_load(p["bytes_received"], now - ld.started)
                log.info(
                    "prfaas: loaded transfer %s for request %s: %d bytes in %d items "
                    "(%d more bytes of %d prefix tokens already cached here were not sent); "
                    "landed %.1f ms after the load was announced, reported to vLLM %.1f ms later",
                    t.transfer_id,
                    rid,
                    p["bytes_received"],
                    sum(len(m.items) for m in ms),
                    p["bytes_skipped"],
                    t.num_local_tokens,
                    ((ld.landed or now) - ld.started) * 1e3,
                    (now - (ld.landed or now)) * 1e3,
                )
                continue
            failed.add(rid)
            self.stats.record_load_failure(type(err).__name__)
            if len(self.groups) == 1 and not ld.abandoned:
                # vLLM takes block-level errors for single-group models only (with several groups,
                # hybrid/SWA, failed_recving alone makes it recompute the request). Only the blocks
                # this load was to write: the locally cached prefix before them is shared with
                # other requests, which lost nothing.
                held = t.num_local_tokens // self.groups[0].block_size
                self._load_errors.update(b for b in t.block_ids[0][held:] if b)
            log.warning(
                "prfaas: KV load for request %s failed (%s: %s); decode recomputes the prefill locally",
                rid,
                type(err).__name__,
                err,
            )
        # the scheduler only reports finished ids once; keep those not yet matched to a send
        pending = set(self._sends) | set(self._send_futs) | {t.req_id for t in self.meta.sends}
        self._sched_finished &= pending
        self._final_sends &= pending
        return sending, recving, failed

    @staticmethod
    def _release_staging(st: _Send) -> None:
        """Give a transfer's pinned staging back to the pool (once no session reads it)."""
        for buf in st.buffers:
            buf.wait()
            buf.release()
        st.buffers = []

    def take_stats(self) -> PrfaaSConnectorStats | None:
        """This interval's transfers for vLLM's stats channel, or None when nothing happened."""
        if self.stats.is_empty():
            return None
        pool = self.packer.pool_stats()
        if pool:
            self.stats.record_staging_pool(pool["capacity_bytes"], pool.get("in_use_bytes", 0))
        return self.stats.clone_and_reset()

    def load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        for st in self._sends.values():
            for leg in st.legs:
                leg.handle.abort("vLLM shutting down")
        for ld in self._loads.values():
            for h in ld.handles:
                h.abort("vLLM shutting down")
        if self.sender:
            self.sender.close()
        if self.receiver:
            self.receiver.close()
        if self._stage_exec is not None:
            self._stage_exec.shutdown(wait=False, cancel_futures=True)
