"""Worker half of the connector (runs where the KV cache tensors live).

Producer: each attention layer is packed and pushed as its ``save_kv_layer`` fires; groups whose
layers have no hook (Mamba/GDN) are pushed from the registered tensors in ``wait_for_save``, when
the step's forward is over and their state is final. Source buffers live until the receiver
confirms (``done``), and the request's blocks stay held by ``delay_free`` until then; the
transfer deadline is the lease, so a vanished receiver releases them.
Consumer: announces each load to the receiver with a sink that scatters every landed item into
the request's blocks; reports completion or failure through ``get_transfer_results``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from prfaas_plugin.engines.vllm import layout, packing
from prfaas_plugin.engines.vllm.meta import PrfaaSMetadata, Transfer
from prfaas_plugin.engines.vllm.options import Options
from prfaas_plugin.engines.vllm.stats import PrfaaSConnectorStats
from prfaas_plugin.transfer import (
    ItemSpec,
    ReceiveHandle,
    SendHandle,
    TransferError,
    TransferManifest,
    TransferReceiver,
    TransferSender,
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


class _Sink(StagedSink[torch.Tensor]):
    """Receives one request's items into staging buffers, then scatters each into its blocks."""

    def __init__(self, w: WorkerSide, t: Transfer) -> None:
        super().__init__()
        self.w, self.t = w, t

    def land(self, item: ItemSpec) -> tuple[memoryview, torch.Tensor]:
        g, first, count, part, lname = layout.parse_item_name(item.name)
        cache, bdim = self.w.part(lname, part)
        if count * packing.block_bytes(cache, bdim) != item.nbytes or g >= len(self.t.block_ids):
            raise ValueError(f"item {item.name}: {item.nbytes} bytes does not fit the local layout")
        buf = torch.empty(item.nbytes, dtype=torch.uint8)
        return buf.numpy().data, buf

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
        cache, bdim = self.w.part(lname, part)
        return self._held_blocks(g, first, count) * packing.block_bytes(cache, bdim)

    def commit(self, item: ItemSpec, staged: torch.Tensor) -> None:
        g, first, count, part, lname = layout.parse_item_name(item.name)
        cache, bdim = self.w.part(lname, part)
        ids = self.t.block_ids[g][first : first + count]
        packing.unpack(cache, bdim, ids, staged, skip_before=self._held_blocks(g, first, count))


@dataclass
class _Send:
    """A producer transfer in flight: its handle, the layers already sent, and the packed
    buffers the handle reads from (kept until ``done``)."""

    handle: SendHandle
    transfer: Transfer
    sent_layers: set[str] = field(default_factory=set)
    buffers: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Load:
    """A consumer load announced to the receiver (``started``: monotonic seconds)."""

    done: Future[TransferManifest]
    transfer: Transfer
    started: float
    handle: ReceiveHandle | None = None  # None when it failed before reaching a receiver


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
        self.receiver: TransferReceiver | None = None
        self.sender: TransferSender | None = None
        self.meta = PrfaaSMetadata()
        self._sends: dict[str, _Send] = {}
        self._send_futs: dict[str, Future[None]] = {}
        self._loads: dict[str, _Load] = {}
        self._sched_finished: set[str] = set()
        self._load_errors: set[int] = set()
        self._lock = threading.Lock()
        self.stats = PrfaaSConnectorStats()

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
        transport = type(self).transport_factory(self.opts.endpoint_spec(self.cfg.kv_transfer_config.engine_id))
        if self.consumer:
            rank = self.fp.fields["tp_rank"]
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

    def part(self, layer: str, i: int) -> tuple[torch.Tensor, int]:
        try:
            return self.parts[layer][i]
        except (KeyError, IndexError):
            raise ValueError(f"unknown layer part {layer}[{i}]") from None

    # -- producer ------------------------------------------------------------------------------
    def _items(self, t: Transfer) -> list[ItemSpec]:
        items = []
        order = 0
        for g in self.groups:
            first, end = layout.block_range(g, t.num_tokens, len(t.block_ids[g.index]))
            for lname in g.layer_names:
                for pi, (x, bdim) in enumerate(self.parts.get(lname, ())):
                    items.append(
                        ItemSpec(
                            layout.item_name(g.index, first, end - first, lname, pi),
                            (end - first) * packing.block_bytes(x, bdim),
                            order,
                        )
                    )
                    order += 1
        return items

    def _open(self, t: Transfer) -> None:
        if t.req_id in self._sends or t.req_id in self._send_futs:
            return
        try:
            assert self.sender is not None, "a kv_consumer-only instance cannot produce"
            manifest = TransferManifest(t.transfer_id, tuple(self._items(t)), self.fp, sender_id="vllm")
            h = self.sender.open(t.endpoint, manifest, t.token, deadline_s=t.deadline_s)
            self._sends[t.req_id] = _Send(h, t)
        except Exception as e:  # never pin blocks: report the request as done (failed) at once
            log.error("prfaas: cannot open transfer %s for %s: %s", t.transfer_id, t.req_id, e)
            self.stats.record_send_failure(type(e).__name__)
            f: Future[None] = Future()
            f.set_exception(e)
            self._send_futs[t.req_id] = f

    def _send_layer(self, rid: str, lname: str) -> None:
        st = self._sends[rid]
        h, t, sent, keep = st.handle, st.transfer, st.sent_layers, st.buffers
        if lname in sent or lname not in self.group_of:
            return
        sent.add(lname)
        g = self.groups[self.group_of[lname]]
        first, end = layout.block_range(g, t.num_tokens, len(t.block_ids[g.index]))
        ids = t.block_ids[g.index][first:end]
        for pi, (x, bdim) in enumerate(self.parts[lname]):
            buf = packing.pack(x, bdim, ids)
            keep.append(buf)
            try:
                h.send(layout.item_name(g.index, first, end - first, lname, pi), buf)
            except TransferError as e:  # one line per transfer: stop sending its other layers
                log.warning("prfaas: transfer %s failed while sending %s: %s", t.transfer_id, lname, e)
                sent.update(self.group_of)
                return

    def save_kv_layer(self, layer_name: str) -> None:
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

    # -- consumer ------------------------------------------------------------------------------
    def start_load_kv(self) -> None:
        for t in self.meta.loads:
            if self.receiver is None:
                log.error("prfaas: request %s asks for a load but this instance is not a consumer", t.req_id)
                f: Future[TransferManifest] = Future()
                f.set_exception(RuntimeError("not a kv_consumer"))
                self._loads[t.req_id] = _Load(f, t, time.monotonic())
                continue
            h = self.receiver.expect(t.transfer_id, t.token, self.fp, _Sink(self, t), deadline_s=t.deadline_s)
            self._loads[t.req_id] = _Load(h.done, t, time.monotonic(), h)

    # -- completion ----------------------------------------------------------------------------
    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        self._sched_finished |= set(finished_req_ids)
        sending: set[str] = set()
        for rid in list(self._sends):
            h = self._sends[rid].handle
            if h.done.done():
                self._send_futs[rid] = h.done
                del self._sends[rid]  # drops the packed buffers: the receiver has them
                if h.done.exception() is None:  # what crossed: less than the manifest when D held a prefix
                    self.stats.record_sent(h.progress().get("bytes_confirmed", 0))
                else:
                    self.stats.record_send_failure(type(h.done.exception()).__name__)
        for rid in list(self._send_futs):
            if rid in self._sched_finished:
                f = self._send_futs.pop(rid)
                self._sched_finished.discard(rid)
                if f.exception() is not None:
                    log.warning("prfaas: producer transfer for %s ended with %s; blocks freed", rid, f.exception())
                sending.add(rid)
        recving, failed = set(), set()
        for rid in list(self._loads):
            ld = self._loads[rid]
            t = ld.transfer
            if not ld.done.done():
                continue
            del self._loads[rid]
            recving.add(rid)
            err = ld.done.exception()
            if err is None:
                m = ld.done.result()
                p = {"bytes_received": 0, "bytes_skipped": 0, **(ld.handle.progress() if ld.handle else {})}
                self.stats.record_load(p["bytes_received"], time.monotonic() - ld.started)
                log.info(
                    "prfaas: loaded transfer %s for request %s: %d bytes in %d items "
                    "(%d more bytes of %d prefix tokens already cached here were not sent)",
                    t.transfer_id,
                    rid,
                    p["bytes_received"],
                    len(m.items),
                    p["bytes_skipped"],
                    t.num_local_tokens,
                )
                continue
            failed.add(rid)
            self.stats.record_load_failure(type(err).__name__)
            if len(self.groups) == 1:  # vLLM takes block-level errors for single-group models only;
                # with several groups (hybrid/SWA) failed_recving alone makes it recompute the request
                self._load_errors.update(b for b in t.block_ids[0] if b)
            log.warning(
                "prfaas: KV load for request %s failed (%s: %s); decode recomputes the prefill locally",
                rid,
                type(err).__name__,
                err,
            )
        # the scheduler only reports finished ids once; keep those not yet matched to a send
        self._sched_finished &= set(self._sends) | set(self._send_futs) | {t.req_id for t in self.meta.sends}
        return sending, recving, failed

    def take_stats(self) -> PrfaaSConnectorStats | None:
        """This interval's transfers for vLLM's stats channel, or None when nothing happened."""
        return None if self.stats.is_empty() else self.stats.clone_and_reset()

    def load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        for st in self._sends.values():
            st.handle.abort("vLLM shutting down")
        for ld in self._loads.values():
            if ld.handle is not None:
                ld.handle.abort("vLLM shutting down")
        if self.sender:
            self.sender.close()
        if self.receiver:
            self.receiver.close()
