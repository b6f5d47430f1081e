"""Scheduler half of the connector (runs in vLLM's EngineCore process).

Chunked prefill streams: a producer's transfer is announced at its first scheduled step, and every
step tells the worker how many tokens are final (``Transfer.ready_tokens``), so each chunk's
full-attention blocks leave as that chunk's forward finishes; the rest goes with the last chunk.

N-1 backoff, for every model: the producer prefills prompt[:-1] and ships that KV/state; the
consumer loads those N-1 tokens and computes the last prompt token itself. For recurrent layers
this is required (the state after N tokens cannot be rewound to feed token N again); using it for
attention-only models as well keeps one code path and costs one token of compute on decode.

Decode-initiated offload (``offload`` in the options, docs/vllm.md): a request that arrives
without ``kv_transfer_params`` is decided here, in :meth:`SchedulerSide.get_num_new_matched_tokens`,
where vLLM has just looked up its prefix cache: ``num_prompt_tokens - num_computed`` is the exact
uncached length. Above t, the request becomes a consumer exactly as if a router had set it up
(fresh transfer params; offload.py sends the producer half from its own thread) and its tokens
are reported as an asynchronous load; otherwise it prefills here and the decision cost a
subtraction, a comparison and a record. Requests that carry ``kv_transfer_params`` were set up
by a router (or another connector) and are never decided again.
"""

from __future__ import annotations

import logging
from typing import Any

from prfaas_plugin.engines.vllm import compat, layout
from prfaas_plugin.engines.vllm.meta import PrfaaSMetadata, Transfer
from prfaas_plugin.engines.vllm.options import Options
from prfaas_plugin.engines.vllm.stats import PrfaaSConnectorStats
from prfaas_plugin.protocol.requests import BadParams, RequestParams, outcome_params, parse_params, transfer_params

log = logging.getLogger("vllm.prfaas")  # child of vLLM's logger: same handlers and format


#: Offload decisions and their reasons, as the metrics label them.
OFFLOAD, LOCAL = "offload", "local"
R_ABOVE, R_WITHIN = "above_threshold", "within_threshold"
R_BUSY, R_UNSUPPORTED = "prfaas_unavailable", "unsupported_request"


def _unsupported(request: Any) -> bool:
    """Requests whose KV a remote prefill of the prompt's token ids cannot stand for: prompt
    embeddings, multimodal inputs, LoRA adapters (the PrfaaS side would need the same adapter
    under the same name), pooling, and prompt logprobs (KV pushed from elsewhere has none)."""
    sp = getattr(request, "sampling_params", None)
    return (
        request.prompt_token_ids is None
        or getattr(request, "prompt_embeds", None) is not None
        or bool(getattr(request, "mm_features", None))
        or getattr(request, "lora_request", None) is not None
        or getattr(request, "pooling_params", None) is not None
        or sp is None
        or sp.prompt_logprobs is not None
    )


class SchedulerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, opts: Options | None = None) -> None:
        self.groups = layout.groups_of(kv_cache_config)
        self._vllm_config = vllm_config
        self._kv_cache_config = kv_cache_config
        self._params: dict[str, RequestParams] = {}
        self._pending_loads: dict[str, Transfer] = {}
        self._loaded: set[str] = set()
        self._sent: dict[str, Transfer] = {}
        self._meta = PrfaaSMetadata()
        self._kv_manager: Any = None
        self._prompt_len: dict[str, int] = {}
        self.stats = PrfaaSConnectorStats()
        if any(g.kind == "state" for g in self.groups):
            # the one layout setting a peer cannot see in the page shapes (layout.CONV_LAYOUT_FIELD)
            log.info(
                "prfaas: recurrent-state conv layout %s (%s); PrfaaS peers must use the same, or their "
                "transfers are refused at the handshake",
                layout.conv_state_layout(),
                layout.CONV_LAYOUT_FIELD,
            )
        # -- decode-initiated offload (None: only a router decides) --
        self.offload: Any = None  # offload.Offloader; imported only when configured
        self._offloaded: set[str] = set()  # decided here, remote prefill asked for
        self._local: set[str] = set()  # decided here to prefill locally (sticks until finished)
        self._aborts: list[str] = []  # offloaded loads to stop this step (their prefill failed)
        oo = opts.offload if opts is not None else None
        if oo is not None:
            ktc = vllm_config.kv_transfer_config
            if not ktc.is_kv_consumer:
                raise ValueError(
                    "prfaas: 'offload' needs kv_role kv_consumer or kv_both (this instance must receive the KV)"
                )
            from prfaas_plugin.engines.vllm.offload import Job, Offloader

            self._job = Job
            self.offload = Offloader(oo, vllm_config.cache_config.block_size)
            log.info(
                "prfaas: deciding offloads here (block size %d): t=%.0f tokens%s, PrfaaS instances %s, KV to %s",
                vllm_config.cache_config.block_size,
                oo.threshold_tokens,
                f" until {oo.threshold_url} answers" if oo.threshold_url else "",
                ", ".join(oo.prefill_urls),
                oo.kv_endpoint,
            )

    def bind_kv_cache_manager(self, mgr: Any) -> None:
        self._kv_manager = mgr

    def _params_of(self, request: Any) -> RequestParams | None:
        rid = request.request_id
        if rid not in self._params:
            try:
                p = parse_params(request.kv_transfer_params)
            except BadParams as e:
                log.error("prfaas: request %s has malformed kv_transfer_params (%s); served locally", rid, e)
                p = None
            if p is None:
                return None
            self._params[rid] = p
        return self._params[rid]

    def on_new_request(self, request: Any) -> None:
        p = self._params_of(request)
        if p is None or p.role != "producer" or request.num_prompt_tokens < 2 or request.prompt_token_ids is None:
            return
        compat.drop_last_prompt_tokens(request, 1, self._vllm_config, self._kv_cache_config)
        request.max_tokens = 1

    def may_load_async(self, request: Any) -> bool:
        """True for a request whose params make this engine a PrfaaS consumer: those are the ones
        :meth:`get_num_new_matched_tokens` answers with an async load (vLLM 0.34 counts them
        against ``--max-num-inflight-kv-loads``). Parsed params are cached, so this stays cheap.
        With ``offload``, a request not decided yet may become one: those whose prompt is longer
        than t (an upper bound of their uncached length) say True."""
        p = self._params_of(request)
        if p is None and self.offload is not None and request.request_id not in self._local:
            return not request.kv_transfer_params and request.num_prompt_tokens > self.offload.threshold.current()[0]
        return p is not None and p.role == "consumer" and request.request_id not in self._loaded

    def get_num_new_matched_tokens(self, request: Any, num_computed: int) -> tuple[int, bool]:
        if self.offload is not None and self.offload.failed:
            self._drain_failures()
        p = self._params_of(request)
        if p is None and self.offload is not None:
            p = self._decide(request, num_computed)
        if p is not None and p.role == "producer":
            self._prompt_len[request.request_id] = request.num_prompt_tokens
        if p is None or p.role != "consumer" or request.request_id in self._loaded:
            return 0, False
        n = request.num_prompt_tokens - 1 - num_computed
        return (n, True) if n > 0 else (0, False)

    # -- decode-initiated offload ---------------------------------------------------------------
    def _decide(self, request: Any, num_computed: int) -> RequestParams | None:
        """Consumer params when this request is offloaded now, else None (prefill here). Decided
        once per request: a request vLLM asks about again (no free blocks yet, preempted) keeps
        its decision."""
        rid = request.request_id
        if rid in self._local or request.kv_transfer_params:
            return None
        uncached = request.num_prompt_tokens - num_computed
        t, _ = self.offload.threshold.current()
        if uncached <= t:
            reason = R_WITHIN
        elif request.num_prompt_tokens - 1 - num_computed <= 0 or _unsupported(request):
            reason = R_UNSUPPORTED
        elif not self.offload.has_capacity():
            reason = R_BUSY
        else:
            return self._offload(request, uncached, num_computed, t)
        self._local.add(rid)
        self.stats.record_decision(LOCAL, reason, uncached, t)
        if reason != R_WITHIN:
            log.debug("prfaas: request %s prefills here (%s): %d uncached tokens, t=%.0f", rid, reason, uncached, t)
        return None

    def _offload(self, request: Any, uncached: int, num_computed: int, t: float) -> RequestParams:
        rid = request.request_id
        oo = self.offload.opts
        prod, cons = transfer_params(oo.kv_endpoint, oo.deadline_s)
        p = parse_params(cons)
        assert p is not None
        self._params[rid] = p
        self._offloaded.add(rid)
        self.offload.submit(self._job(rid, request, prod, oo.deadline_s, getattr(request, "cache_salt", None)))
        self.stats.record_decision(OFFLOAD, R_ABOVE, uncached, t)
        log.info(
            "prfaas: request %s offloaded: %d uncached prompt tokens (%d cached here) > t=%.0f; transfer %s",
            rid,
            uncached,
            num_computed,
            t,
            p.transfer_id,
        )
        return p

    def _drain_failures(self) -> None:
        """Remote prefills that failed: stop their loads now (the worker aborts the receive, vLLM
        sees a failed load and, with the recompute policy, prefills locally), or, for a request
        vLLM has not given blocks yet, turn it back into a local one."""
        failed = self.offload.failed
        while failed:
            rid, kind, why = failed.popleft()
            if rid not in self._offloaded:
                continue  # finished here meanwhile
            self._offloaded.discard(rid)
            self.stats.record_offload_failure(kind)
            if rid in self._loaded:
                self._aborts.append(rid)
                how = "its load is stopped and it prefills here"
            else:
                self._params.pop(rid, None)
                self._local.add(rid)
                how = "it prefills here"
            log.warning("prfaas: offloaded prefill of request %s failed (%s); %s", rid, why, how)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external: int) -> None:
        p = self._params.get(request.request_id)
        if p is None or p.role != "consumer" or num_external <= 0:
            return
        num_total = request.num_prompt_tokens - 1
        self._pending_loads[request.request_id] = Transfer(
            request.request_id,
            p.transfer_id,
            p.token,
            p.deadline_s,
            num_total,
            tuple(list(b) for b in blocks.get_block_ids()),
            num_local_tokens=num_total - num_external,
        )
        self._loaded.add(request.request_id)

    def build_connector_meta(self, so: Any) -> PrfaaSMetadata:
        meta, self._meta = self._meta, PrfaaSMetadata()
        meta.loads.extend(self._pending_loads.values())
        self._pending_loads.clear()
        if self.offload is not None:
            if self.offload.failed:
                self._drain_failures()
            meta.aborts.extend(self._aborts)
            self._aborts.clear()
        sched = so.num_scheduled_tokens
        for rid, p in list(self._params.items()):
            if p.role != "producer" or rid in self._sent or rid not in sched:
                continue
            req = self._request(so, rid)
            if req is None:
                continue
            computed, prompt = req
            ready = min(computed + sched[rid], prompt)
            block_ids = tuple(list(b) for b in self._kv_manager.get_blocks(rid).get_block_ids())
            t = Transfer(
                rid,
                p.transfer_id,
                p.token,
                p.deadline_s,
                prompt,
                block_ids,
                endpoint=p.decode_endpoint,
                ready_tokens=ready,
                slice_tokens=self._slice_tokens(prompt),
            )
            if t.final:  # the last chunk: attention KV, sliding-window tail and recurrent state
                self._sent[rid] = t
            meta.sends.append(t)  # an earlier chunk: the worker streams the blocks it finished
        return meta

    def _slice_tokens(self, prompt: int) -> int:
        """Tokens per full-attention item: one step's token budget when chunked prefill splits
        this prompt (so each chunk's blocks can cross while the next chunk is computed), else
        0 (one item per layer, sent when the prefill's single step is over)."""
        sc = getattr(self._vllm_config, "scheduler_config", None)
        budget = int(getattr(sc, "max_num_batched_tokens", 0) or 0)
        return budget if 0 < budget < prompt else 0

    def _request(self, so: Any, rid: str) -> tuple[int, int] | None:
        for r in so.scheduled_new_reqs:
            if r.req_id == rid:
                return r.num_computed_tokens, len(r.prompt_token_ids or ())
        c = so.scheduled_cached_reqs
        if rid in c.req_ids:
            i = c.req_ids.index(rid)
            prompt = self._prompt_len.get(rid)
            return None if prompt is None else (c.num_computed_tokens[i], prompt)
        return None

    def predicted_bytes(self, t: Transfer) -> int:
        """Bytes the layout says this transfer moves (what the test compares with the wire)."""
        total = 0
        for g in self.groups:
            first, end = layout.block_range(g, t.num_tokens, len(t.block_ids[g.index]))
            total += (end - first) * g.page_bytes * len(g.layer_names)
        return total

    def request_finished(self, request: Any, block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        rid = request.request_id
        p = self._params.pop(rid, None)
        self._loaded.discard(rid)
        self._pending_loads.pop(rid, None)
        t = self._sent.pop(rid, None)
        self._prompt_len.pop(rid, None)
        if self.offload is not None:
            self._local.discard(rid)
            if rid in self._offloaded:
                self._offloaded.discard(rid)
                self.offload.cancel(rid)
        if p is None or p.role != "producer":
            return False, None
        if t is None:
            return False, outcome_params(p.transfer_id, False, error="request finished before its prefill completed")
        return True, outcome_params(p.transfer_id, True, t.num_tokens, self.predicted_bytes(t))

    def take_stats(self) -> PrfaaSConnectorStats | None:
        """This interval's offload decisions for vLLM's stats channel (None when there were none)."""
        return None if self.stats.is_empty() else self.stats.clone_and_reset()

    def shutdown(self) -> None:
        if self.offload is not None:
            self.offload.close()
