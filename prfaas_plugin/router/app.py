"""The router service: an OpenAI-compatible front that places each request's prefill (remote
PrfaaS or local) and drives the connector's request protocol (docs/protocol.md).

Per request: tokenize (chat template applied), find cached prefixes, decide (policy.py), then
- local on an instance that prefills and decodes: proxy the request unchanged;
- otherwise: send the producer request (``max_tokens: 1``, ``kv_transfer_params`` naming the
  decoder's transfer endpoint) and the consumer request *at the same time*, stream the consumer's
  answer back. If the producer fails before the consumer answers, the consumer request is
  cancelled and re-sent without ``kv_transfer_params`` (local prefill): the client sees no error.
A client that disconnects cancels both upstream requests (vLLM aborts a request whose HTTP
connection closes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas_plugin.protocol.requests import sglang_bodies, vllm_bodies
from prfaas_plugin.router.asgi import (
    ClientGone,
    Receive,
    Reply,
    Scope,
    Send,
    client_gone,
    header,
    json_reply,
    read_body,
    send_reply,
)
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.egress import SENT_BYTES, EgressMeter, sent_bytes_total
from prfaas_plugin.router.gcpace import GcPacer
from prfaas_plugin.router.instances import Fleet, Instance
from prfaas_plugin.router.metrics import RouterMetrics
from prfaas_plugin.router.policy import Decision, NoInstance, bandwidth_mode, decide, prfaas_overloaded
from prfaas_plugin.router.prefix_index import PrefixIndex
from prfaas_plugin.router.rebalance import SplitApplier
from prfaas_plugin.router.threshold import ThresholdController
from prfaas_plugin.router.tokenize import PromptError, PromptTokenizer
from prfaas_plugin.router.upstream import Stream, Unreachable, Upstream, UpstreamError

log = logging.getLogger("prfaas.router")

MAX_BODY_BYTES = 64 << 20
#: Request bodies up to this size are tokenised inline on the event loop (see Router._tokenize).
INLINE_TOKENIZE_BYTES = 8 << 10


class ClientError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error(status: int, message: str, code: str = "invalid_request_error") -> Reply:
    return json_reply({"error": {"message": message, "type": code, "code": status}}, status)


def _error_response(status: int, message: str, code: str = "invalid_request_error") -> Response:
    """``_error`` for the FastAPI (admin) endpoints."""
    reply = _error(status, message, code)
    return Response(reply.body, status_code=status, media_type=reply.headers["content-type"])


@dataclass
class Record:
    """What the router knows of one request (``/admin/requests``; the demo's report)."""

    request_id: str
    endpoint: str
    route: str
    reason: str
    l_total: int
    l_prefix: int
    l_uncached: int
    threshold: float
    prefill_instance: str | None
    decode_instance: str
    started_at: float
    stream: bool
    kv_bytes: int = 0
    #: Egress estimated for a producer that reported no bytes (see ``_estimated_kv_bytes``).
    kv_bytes_estimated: int = 0
    transfer_id: str | None = None
    transfer_status: str | None = None
    fallback: str | None = None
    queue_s: float = 0.0
    prefill_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    #: The router's own share of ``ttft_s`` (``Router._overhead``); None if it fell back or was re-placed.
    overhead_s: float | None = None
    #: Instances found unreachable at dispatch before this one took the request.
    rerouted: int = 0
    status: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RecentShare:
    """The share of the last ``n`` values equal to ``value``, kept as a running count (the offload
    fraction gauge; recounting the window cost a 256-step loop per request)."""

    def __init__(self, n: int, value: str) -> None:
        self.window: collections.deque[str] = collections.deque(maxlen=n)
        self.value = value
        self.count = 0

    def add(self, item: str) -> float:
        w = self.window
        if len(w) == w.maxlen and w[0] == self.value:
            self.count -= 1
        w.append(item)
        self.count += item == self.value
        return self.count / len(w)


@dataclass
class _Producer:
    ok: bool
    kv_bytes: int = 0
    error: str = ""
    seconds: float = 0.0


@dataclass
class Router:
    cfg: RouterConfig
    tokenizer: PromptTokenizer
    fleet: Fleet = field(init=False)
    index: PrefixIndex = field(init=False)
    controller: ThresholdController = field(init=False)
    metrics: RouterMetrics = field(init=False)
    client: Upstream | None = None

    def __post_init__(self) -> None:
        self.fleet = Fleet.from_config(self.cfg)
        self.index = PrefixIndex(self.cfg.block_size)
        self.controller = ThresholdController(self.cfg.threshold, self.cfg.link_gbps)
        self.metrics = RouterMetrics()
        self.records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self.recent_routes = RecentShare(256, "prfaas")
        self._subscribers: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.splitter: SplitApplier | None = None
        self.egress = EgressMeter()
        self._serving = 0  # completion requests open now (the GC pacer idles at 0)
        g = self.cfg.gc
        self.gc_pacer = (
            GcPacer(g.young_every_ms / 1e3, g.middle_every, g.full_every_s, g.idle_every_s)
            if g.young_every_ms > 0
            else None
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        t = self.cfg.timeouts
        self.client = Upstream(t.connect_s, t.request_s, t.keepalive_s)
        await self.client.start()
        await self.fleet.check_health(self.client, t.health_timeout_s)  # at start, one slow probe decides
        for inst in self.fleet.instances:
            if not inst.healthy:
                log.warning("at start, instance %s (%s) is unreachable: %s", inst.url, inst.cluster, inst.last_error)
        self._start_event_feeds()
        self._tasks.append(asyncio.create_task(self._health_loop()))
        self._tasks.append(asyncio.create_task(self._threshold_loop()))
        if self.cfg.threshold.egress_scrape_s > 0:
            self._tasks.append(asyncio.create_task(self._egress_loop()))
        if self.gc_pacer is not None:
            self._tasks.append(asyncio.create_task(self.gc_pacer.run(lambda: self._serving == 0)))
        if self.cfg.threshold.apply_split:
            th = self.cfg.threshold
            self.splitter = SplitApplier(self.client, self.index, th.split_cooldown_s, th.drain_timeout_s, t.prefill_s)
            self._tasks.append(asyncio.create_task(self._split_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in self._subscribers:
            sub.stop()
        if self.client is not None:
            await self.client.close()

    def _start_event_feeds(self) -> None:
        feeds = [i for i in self.fleet.instances if i.kv_events]
        if not feeds:
            return
        try:
            import msgspec  # noqa: F401
            import zmq  # noqa: F401
        except ImportError:
            log.warning("kv_events configured but pyzmq/msgspec are not installed; using the routing record only")
            return
        from prfaas_plugin.router.events import EventSubscriber

        for inst in feeds:
            sub = EventSubscriber(self.index, inst.url, inst.kv_events or "")
            sub.start()
            self._subscribers.append(sub)

    async def _health_loop(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.cfg.timeouts.health_every_s)
            t = self.cfg.timeouts
            await self.fleet.check_health(self.client, t.health_timeout_s, t.health_failures)
            for inst in self.fleet.instances:
                self.metrics.healthy.labels(inst.cluster, inst.url).set(1 if inst.healthy else 0)

    async def _split_loop(self) -> None:
        assert self.splitter is not None
        while True:
            await asyncio.sleep(1.0)
            advice = self.controller.advice
            if advice is None:
                continue
            try:
                outcome = await self.splitter.apply(advice, self.fleet)
            except Exception:
                log.exception("applying the P/D split failed")
                continue
            if outcome is not None:
                self.metrics.role_switches.labels(outcome).inc()

    async def _egress_loop(self) -> None:
        """Read the producers' sent-bytes counters (router/egress.py says why)."""
        assert self.client is not None
        every = self.cfg.threshold.egress_scrape_s
        while True:
            await asyncio.gather(*(self._read_egress(i, every) for i in self.fleet.of_kind("prfaas")))
            await asyncio.sleep(every)

    async def _read_egress(self, inst: Instance, timeout_s: float) -> None:
        assert self.client is not None
        try:
            status, text = await self.client.get_text(f"{inst.url}/metrics", max(timeout_s, 1.0))
        except UpstreamError:
            return  # down or slow: its counter is read again next time (increments are not lost)
        value = sent_bytes_total(text) if status == 200 else None
        if value is None:
            if self.egress.measured(inst.url):
                log.warning(
                    "instance %s no longer exposes %s; using the bytes its answers report",
                    inst.url,
                    " or ".join(SENT_BYTES),
                )
            self.egress.forget(inst.url)
            return
        delta = self.egress.update(inst.url, value)
        if delta > 0:
            self.controller.record_egress(delta)

    async def _threshold_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._tick()

    def _tick(self) -> None:
        t = self.controller.tick(self.fleet.queue_depth("prfaas"))
        m = self.metrics
        m.threshold.set(t)
        m.planner_threshold.set(self.controller.t_star)
        m.egress.set(self.controller.egress_gbps())
        m.link_util.set(self.controller.utilisation())
        if self.gc_pacer is not None:
            for gen, n in enumerate(self.gc_pacer.collections):
                m.gc_collections.labels(str(gen)).set(n)
            m.gc_longest.set(self.gc_pacer.longest_s)
        if self.controller.advice is not None:
            m.split.labels("prefill").set(self.controller.advice.n_prefill)
            m.split.labels("decode").set(self.controller.advice.n_decode)

    def bandwidth_mode(self) -> str:
        return bandwidth_mode(self.cfg.bandwidth_mode, self.controller.utilisation(), self.cfg.threshold.egress_low)

    # -- request handling -------------------------------------------------------------------------
    def _validate(self, body: Any, chat: bool) -> None:
        if not isinstance(body, dict):
            raise ClientError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ClientError(400, "'model' is required and must be a string")
        if model != self.cfg.model:
            raise ClientError(
                404, f"the model {model!r} does not exist; this router serves {self.cfg.model!r}", "model_not_found"
            )
        if "stream" in body and not isinstance(body["stream"], bool):
            raise ClientError(400, "'stream' must be a boolean")
        for key in ("max_tokens", "max_completion_tokens", "n"):
            v = body.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ClientError(400, f"'{key}' must be a positive integer")
        if body.get("n", 1) != 1:
            raise ClientError(400, "'n' > 1 is not supported by the PrfaaS router")
        if "kv_transfer_params" in body:
            raise ClientError(400, "'kv_transfer_params' is set by the router; clients must not send it")
        if chat and "messages" not in body:
            raise ClientError(400, "'messages' is required")
        if not chat and "prompt" not in body:
            raise ClientError(400, "'prompt' is required")

    async def _tokenize(self, body_bytes: int, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """Short prompts are tokenised on the event loop: handing a ~50 us job to a worker
        thread costs more than the job, and under load each hand-off waits for the GIL (up to
        its 5 ms switch interval), which added ~250 ms to the time to first byte at 200 streams
        in bench/router.py. Long prompts (milliseconds of work) go to a thread so the loop keeps
        relaying the other streams."""
        if body_bytes <= INLINE_TOKENIZE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def serve(self, scope: Scope, receive: Receive, send: Send, path: str, chat: bool) -> None:
        """One completion request, end to end (plain ASGI: see asgi.py for why)."""
        arrived = time.monotonic()
        self._serving += 1
        if self._serving == 1 and self.gc_pacer is not None:
            self.gc_pacer.wake()
        try:
            await self._serve(scope, receive, send, path, chat, arrived)
        finally:
            self._serving -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send, path: str, chat: bool, arrived: float) -> None:
        rid = header(scope, b"x-request-id") or os.urandom(16).hex()  # as uuid4().hex: 0.6 us, not 2.6
        try:
            raw = await read_body(receive)
        except ClientGone:
            return
        # One watcher for the client leaving, for the request's whole life: while the work runs
        # (handle) and while its answer streams (send_reply).
        gone = asyncio.ensure_future(client_gone(receive))
        try:
            try:
                reply = await self.handle(raw, gone, path, chat, rid, arrived)
            except Exception as exc:
                log.exception("request_id=%s: unhandled router error: %s", rid, exc)
                reply = _error(502, f"upstream or router failure: {type(exc).__name__}", "upstream_error")
            await send_reply(reply, send, gone)
        finally:
            if gone.done():
                if not gone.cancelled():
                    gone.exception()  # retrieved: a server that failed receive() is not our error to log
            else:
                gone.cancel()

    async def handle(
        self, raw: bytes, gone: asyncio.Future[None], path: str, chat: bool, rid: str, arrived: float
    ) -> Reply:
        """The answer to one request; ``gone`` completes if the client leaves meanwhile."""
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not valid JSON: {exc}")
        try:
            self._validate(body, chat)
            if chat:
                tokens = await self._tokenize(len(raw), self.tokenizer.chat_tokens, body["messages"], body)
            else:
                tokens = await self._tokenize(len(raw), self.tokenizer.completion_tokens, body["prompt"])
            if not tokens:
                raise ClientError(400, "the prompt is empty")
            if len(tokens) > self.cfg.max_prompt_tokens:
                raise ClientError(
                    400, f"the prompt has {len(tokens)} tokens, over the limit of {self.cfg.max_prompt_tokens}"
                )
        except ClientError as exc:
            return _error(exc.status, exc.message, exc.code)
        except PromptError as exc:
            return _error(400, str(exc))
        stream = bool(body.get("stream", False))
        # Until the answer starts, a client that leaves cancels the work here (a remote prefill
        # can take seconds); once a stream flows, send_reply watches for it.
        work = asyncio.create_task(self._route(path, body, tokens, stream, rid, arrived))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()  # the client left: cancelling closes both upstream requests
        with contextlib.suppress(BaseException):
            await work
        rec = self.records.get(rid)
        if rec is not None:
            rec.error = "client disconnected"
            self.metrics.requests.labels(rec.route, "client_disconnected").inc()
        return Reply(499)

    async def _route(self, path: str, body: dict, tokens: list[int], stream: bool, rid: str, arrived: float) -> Reply:
        # An instance found unreachable at dispatch is marked unhealthy and the request is placed
        # again (at most once per instance): a dead PrfaaS cluster sends work local.
        for attempt in range(len(self.fleet.instances) + 1):
            t = self.controller.t
            overloaded = self._prfaas_overloaded()
            try:
                d = decide(tokens, self.fleet, self.index, t, self.bandwidth_mode(), exclude_prfaas=overloaded)
            except NoInstance as exc:
                return _error(503, str(exc), "service_unavailable")
            try:
                return await self._dispatch(path, body, tokens, stream, rid, arrived, d, overloaded, attempt)
            except Unreachable as exc:
                bad = d.decode
                bad.healthy, bad.last_error = False, f"unreachable: {exc}"
                log.warning("request_id=%s: %s unreachable, re-routing: %s", rid, bad.url, exc)
                self.metrics.fallbacks.labels("instance unreachable").inc()
            except UpstreamError as exc:
                # The instance took the connection but answered nothing usable (reset, framing):
                # the request may have started there, so it is not re-sent elsewhere.
                log.warning("request_id=%s: %s failed: %s", rid, d.decode.url, exc)
                self.metrics.requests.labels(d.route, "upstream_error").inc()
                return _error(502, f"instance {d.decode.url} failed: {exc}", "upstream_error")
        return _error(503, "no reachable instance", "service_unavailable")

    async def _dispatch(
        self,
        path: str,
        body: dict,
        tokens: list[int],
        stream: bool,
        rid: str,
        arrived: float,
        d: Decision,
        overloaded: bool,
        rerouted: int = 0,
    ) -> Reply:
        t = d.threshold
        reason = "prfaas overloaded" if overloaded and d.route == "local" and d.l_uncached > t else d.reason
        rec = Record(
            rid,
            path,
            d.route,
            reason,
            d.l_total,
            d.l_prefix,
            d.l_uncached,
            t,
            d.prefill.url if d.prefill else None,
            d.decode.url,
            time.time(),
            stream,
        )
        rec.queue_s = time.monotonic() - arrived
        rec.rerouted = rerouted
        self._remember(rec)
        self.controller.observe_length(d.l_uncached)
        self.metrics.decisions.labels(d.route, reason).inc()
        self.metrics.uncached.labels(d.route).observe(d.l_uncached)
        self.metrics.offload.set(self.recent_routes.add(d.route))
        self.metrics.ttft.labels(d.route, "queue").observe(rec.queue_s)
        log.info(
            "request_id=%s route=%s reason=%r l_total=%d l_prefix=%d l=%d t=%.0f prefill=%s decode=%s",
            rid,
            d.route,
            reason,
            d.l_total,
            d.l_prefix,
            d.l_uncached,
            t,
            rec.prefill_instance,
            d.decode.url,
        )
        headers = {
            "x-request-id": rid,
            "x-prfaas-route": d.route,
            "x-prfaas-uncached-tokens": str(d.l_uncached),
            "x-prfaas-threshold": f"{t:.0f}",
        }
        if d.prefill is None:
            resp = await self._open(d.decode, path, body)
            if resp.status_code == 200:
                self.index.record(d.decode.url, tokens)
            return await self._relay(resp, d.decode, rec, headers, arrived, stream)
        return await self._two_phase(path, body, d, rec, tokens, stream, headers, arrived)

    def _prfaas_overloaded(self) -> bool:
        return prfaas_overloaded(self.fleet.of_kind("prfaas"), self.cfg.threshold.queue_high)

    def _remember(self, rec: Record) -> None:
        self.records[rec.request_id] = rec
        while len(self.records) > 10_000:
            self.records.popitem(last=False)

    # -- producer + consumer -------------------------------------------------------------------------
    async def _two_phase(
        self,
        path: str,
        body: dict,
        d: Decision,
        rec: Record,
        tokens: list[int],
        stream: bool,
        headers: dict,
        arrived: float,
    ) -> Reply:
        assert d.prefill is not None
        prod_body, cons_body = self._pd_bodies(body, d.prefill, d.decode, rec)
        prod_task = asyncio.create_task(self._produce(d.prefill, path, prod_body))
        pending: list[asyncio.Task[Any]] = []
        resp: Stream | None = None
        consumer_handled = False  # its Stream is ours to close, or was closed already
        try:
            cons_task = asyncio.create_task(self._open(d.decode, path, cons_body))
            pending.append(cons_task)
            got = await _unless_producer_fails(cons_task, prod_task, lambda st: self._discard(st, d.decode))
            consumer_handled = True
            if got is _PRODUCER_FAILED:
                return await self._fallback(path, body, d, rec, prod_task.result(), stream, headers, arrived)
            resp = got
            first: bytes | None = None
            chunks: AsyncIterator[bytes] | None = None
            if stream and resp.status_code == 200:
                # A streaming answer has its status line at once; its first chunk only comes
                # after the KV landed. A producer failure before that still falls back cleanly.
                chunks = resp.aiter_raw()
                first_task = asyncio.create_task(_next_chunk(chunks))
                pending.append(first_task)
                got = await _unless_producer_fails(first_task, prod_task)
                if got is _PRODUCER_FAILED:
                    await self._discard(resp, d.decode)
                    resp = None
                    return await self._fallback(path, body, d, rec, prod_task.result(), stream, headers, arrived)
                first = got
            elif resp.status_code != 200 and (
                self.cfg.engine == "sglang" or (prod_task.done() and not prod_task.result().ok)
            ):
                # SGLang reports a failed transfer as the decode's error (KVTransferError), and
                # nothing reached the client yet: the same fallback as a failed producer.
                if not prod_task.done():
                    prod_task.cancel()
                    with contextlib.suppress(BaseException):
                        await prod_task
                prod = (
                    prod_task.result()
                    if prod_task.done() and not prod_task.cancelled()
                    else _Producer(False, error="cancelled")
                )
                if prod.ok:
                    prod = _Producer(False, error=f"decode HTTP {resp.status_code}", seconds=prod.seconds)
                await resp.aread()
                await self._discard(resp, d.decode)
                resp = None
                return await self._fallback(path, body, d, rec, prod, stream, headers, arrived)
        except BaseException:
            prod_task.cancel()
            for task in pending:
                task.cancel()
            if (
                not consumer_handled
                and pending
                and pending[0].done()
                and not pending[0].cancelled()
                and pending[0].exception() is None
            ):
                resp = pending[0].result()  # cancelled as the consumer's answer came: close it too
            if resp is not None:
                await self._discard(resp, d.decode)
            raise
        self._finish_producer_later(prod_task, d, rec, tokens)
        return await self._relay(resp, d.decode, rec, headers, arrived, stream, first=first, chunks=chunks)

    def _pd_bodies(self, body: dict, prefill: Instance, decode: Instance, rec: Record) -> tuple[dict, dict]:
        if self.cfg.engine == "sglang":
            prod, cons, room = sglang_bodies(body, prefill.url, prefill.bootstrap_port)
            rec.transfer_id = f"bootstrap_room={room}"
        else:
            assert decode.kv_endpoint is not None
            prod, cons, rec.transfer_id = vllm_bodies(body, decode.kv_endpoint, self.cfg.transfer_deadline_s)
        return prod, cons

    def _finish_producer_later(
        self, prod_task: asyncio.Task[_Producer], d: Decision, rec: Record, tokens: list[int]
    ) -> None:
        def _done(task: asyncio.Task[_Producer]) -> None:
            if task.cancelled():
                return
            res = task.result()
            rec.prefill_s = res.seconds
            rec.kv_bytes = res.kv_bytes
            rec.transfer_status = "sent" if res.ok else f"failed: {res.error}"
            self.metrics.ttft.labels(d.route, "prefill").observe(res.seconds)
            if res.ok and d.prefill is not None:
                if d.route == "prfaas" and not self.egress.measured(d.prefill.url):
                    # No counter to read on that producer: what it reported, or, from producers
                    # that report nothing (SGLang), an estimate of what crossed the link.
                    nbytes = res.kv_bytes
                    if nbytes <= 0:
                        nbytes = rec.kv_bytes_estimated = self._estimated_kv_bytes(d, tokens)
                        self.metrics.egress_estimated.inc(nbytes)
                    self.controller.record_egress(nbytes)
                self.index.record(d.prefill.url, tokens)
                self.index.record(d.decode.url, tokens)
                self.metrics.kv_bytes.labels(d.route).inc(res.kv_bytes)

        if prod_task.done():
            _done(prod_task)
        else:
            prod_task.add_done_callback(_done)

    def _estimated_kv_bytes(self, d: Decision, tokens: list[int]) -> int:
        """KV bytes a transfer to ``d.decode`` carried: the prompt beyond the prefix that decode
        instance holds (not ``d.l_uncached``: in abundant mode that is counted against the
        PrfaaS side's cache, and the decode was picked by load). Call before this request's own
        tokens are recorded for the decode."""
        held = self.index.longest_prefix(tokens, [d.decode.url])[0] if tokens else 0
        return self.controller.predicted_kv_bytes(max(0, d.l_total - held))

    async def _produce(self, inst: Instance, path: str, body: dict) -> _Producer:
        assert self.client is not None
        t0 = time.monotonic()
        self._load(inst, +1)
        try:
            status, parsed, text = await self.client.post_json(f"{inst.url}{path}", body, self.cfg.timeouts.prefill_s)
            if status != 200:
                return _Producer(False, error=f"producer HTTP {status}: {text[:200]}", seconds=time.monotonic() - t0)
            if not isinstance(parsed, dict):
                return _Producer(False, error="producer answered non-JSON", seconds=time.monotonic() - t0)
            params = parsed.get("kv_transfer_params") or {}
            if params.get("status") == "failed":
                return _Producer(
                    False, error=str(params.get("error", "transfer failed")), seconds=time.monotonic() - t0
                )
            return _Producer(True, kv_bytes=int(params.get("bytes") or 0), seconds=time.monotonic() - t0)
        except UpstreamError as exc:
            if isinstance(exc, Unreachable):
                inst.healthy, inst.last_error = False, f"unreachable: {exc}"
            return _Producer(False, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - t0)
        finally:
            self._load(inst, -1)

    async def _fallback(
        self,
        path: str,
        body: dict,
        d: Decision,
        rec: Record,
        prod: _Producer,
        stream: bool,
        headers: dict,
        arrived: float,
    ) -> Reply:
        reason = "prfaas failed" if d.route == "prfaas" else "local producer failed"
        rec.fallback = f"{reason}: {prod.error}"
        rec.transfer_status = f"failed: {prod.error}"
        self.metrics.fallbacks.labels(reason).inc()
        headers = {**headers, "x-prfaas-fallback": reason}
        if self.cfg.engine == "sglang" and not d.decode.can_prefill:
            # An SGLang decode-mode server cannot prefill on its own: pair it with a local
            # prefill server of its cluster (another one than the prefill that just failed).
            local = [
                i
                for i in self.fleet.in_cluster(d.decode.cluster)
                if i.can_prefill and i.routable and i is not d.prefill
            ]
            if not local:
                return _error(
                    502,
                    f"prefill failed ({prod.error}) and cluster {d.decode.cluster!r} has no other "
                    "prefill instance to retry on",
                    "upstream_error",
                )
            again = Decision(
                "local",
                min(local, key=lambda i: i.inflight),
                d.decode,
                d.l_total,
                d.l_prefix,
                d.l_uncached,
                d.threshold,
                d.bandwidth_mode,
                reason,
            )
            log.warning(
                "request_id=%s falling back to local prefill %s -> %s: %s",
                rec.request_id,
                again.prefill.url,
                d.decode.url,
                prod.error,
            )
            prod_body, cons_body = self._pd_bodies(body, again.prefill, d.decode, rec)
            prod_task = asyncio.create_task(self._produce(again.prefill, path, prod_body))
            try:
                resp = await self._open(d.decode, path, cons_body)
            except BaseException:
                prod_task.cancel()
                raise
            self._finish_producer_later(prod_task, again, rec, [])
            return await self._relay(resp, d.decode, rec, headers, arrived, stream)
        log.warning("request_id=%s falling back to local prefill on %s: %s", rec.request_id, d.decode.url, prod.error)
        resp = await self._open(d.decode, path, body)
        return await self._relay(resp, d.decode, rec, headers, arrived, stream)

    # -- HTTP plumbing -----------------------------------------------------------------------------
    def _load(self, inst: Instance, delta: int) -> None:
        inst.inflight += delta
        self.metrics.queue.labels(inst.cluster, inst.url).set(inst.inflight)

    async def _open(self, inst: Instance, path: str, body: dict) -> Stream:
        """Send a request and return once the status line arrived (the body streams later)."""
        assert self.client is not None
        self._load(inst, +1)
        try:
            return await self.client.open(f"{inst.url}{path}", body)
        except BaseException:
            self._load(inst, -1)
            raise

    async def _discard(self, resp: Stream, inst: Instance) -> None:
        await resp.aclose()
        self._load(inst, -1)

    async def _relay(
        self,
        resp: Stream,
        inst: Instance,
        rec: Record,
        headers: dict,
        arrived: float,
        stream: bool,
        first: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
    ) -> Reply:
        """Pass the upstream answer through; account TTFT, load and the outcome."""
        rec.status = resp.status_code
        out_headers = {**headers, "content-type": resp.headers.get("content-type", "application/json")}

        def _close_accounting(outcome: str) -> None:
            self._load(inst, -1)
            inst.served += 1
            rec.total_s = time.monotonic() - arrived
            self.metrics.requests.labels(rec.route, outcome).inc()

        if not stream or resp.status_code != 200:
            try:
                content = await resp.aread()
            except BaseException:
                await resp.aclose()
                self._load(inst, -1)  # the caller counts the outcome (upstream error, client gone)
                raise
            await resp.aclose()
            rec.ttft_s = time.monotonic() - arrived
            self._overhead(rec, resp, arrived, resp.done_at)
            _close_accounting("ok" if resp.status_code == 200 else f"http_{resp.status_code}")
            self.metrics.ttft.labels(rec.route, "total").observe(rec.ttft_s)
            return Reply(resp.status_code, out_headers, content)

        it = chunks if chunks is not None else resp.aiter_raw()

        async def body_iter() -> AsyncIterator[bytes]:
            outcome = "ok"
            try:
                if first is not None:
                    rec.ttft_s = time.monotonic() - arrived
                    self.metrics.ttft.labels(rec.route, "total").observe(rec.ttft_s)
                    yield first
                    self._overhead(rec, resp, arrived, resp.first_body_at)  # resumed once it was written
                async for chunk in it:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.monotonic() - arrived
                        self.metrics.ttft.labels(rec.route, "total").observe(rec.ttft_s)
                        yield chunk
                        self._overhead(rec, resp, arrived, resp.first_body_at)
                    else:
                        yield chunk
            except asyncio.CancelledError:
                outcome = "client_disconnected"
                rec.error = "client disconnected"
                raise
            except UpstreamError as exc:
                outcome = "upstream_error"
                rec.error = f"{type(exc).__name__}: {exc}"
            finally:
                await resp.aclose()  # closing the upstream stream makes vLLM abort the request
                _close_accounting(outcome)

        return Reply(200, out_headers, stream=body_iter())

    def _overhead(self, rec: Record, resp: Stream, arrived: float, answer_at: float) -> None:
        """Record the router's own time in this request's time to first byte: arrival to the
        upstream request written (less the time spent opening connections), plus the answer's
        first bytes (``answer_at``) to their relay (a whole answer: to the reply handed to the
        server). What it leaves out is the instance's time and the network's. Requests that
        fell back or were re-placed are left out: their time before the answering request
        includes a failed producer or an unreachable instance."""
        if rec.fallback is not None or rec.rerouted or not answer_at or not resp.sent_at:
            return
        rec.overhead_s = (resp.sent_at - arrived - resp.connect_wait_s) + (time.monotonic() - answer_at)
        self.metrics.overhead.labels(rec.route).observe(rec.overhead_s)


_PRODUCER_FAILED = object()


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


async def _unless_producer_fails(
    task: asyncio.Task[Any],
    prod_task: asyncio.Task[_Producer],
    discard: Callable[[Stream], Awaitable[None]] | None = None,
) -> Any:
    """``task``'s result, or ``_PRODUCER_FAILED`` (``task`` cancelled) if the producer failed
    first. ``discard`` closes (and un-counts) a Stream that ``task`` made before the cancel."""
    done, _ = await asyncio.wait({task, prod_task}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done and not prod_task.result().ok:
        task.cancel()
        await asyncio.wait((task,))  # not ``await task``: a cancellation of ours must propagate
        if not task.cancelled() and task.exception() is None and isinstance(task.result(), Stream):
            await (discard(task.result()) if discard is not None else task.result().aclose())
        return _PRODUCER_FAILED
    return await task


class RouterApp:
    """The ASGI app ``prfaas router`` serves: the completion endpoints on plain ASGI (asgi.py
    says why), every other endpoint and the lifespan on FastAPI."""

    COMPLETIONS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat

    def __init__(self, router: Router, admin: FastAPI) -> None:
        self.router = router
        self.admin = admin

    @property
    def state(self) -> Any:
        return self.admin.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            chat = self.COMPLETIONS.get(scope["path"])
            if chat is not None:
                if scope["method"] == "POST":
                    await self.router.serve(scope, receive, send, scope["path"], chat)
                else:
                    reply = _error(405, f"{scope['method']} is not allowed here; send POST")
                    reply.headers["allow"] = "POST"
                    await send_reply(reply, send)
                return
        await self.admin(scope, receive, send)


def create_app(cfg: RouterConfig, tokenizer: PromptTokenizer | None = None) -> RouterApp:
    router = Router(cfg, tokenizer or PromptTokenizer(cfg.tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="prfaas router", lifespan=lifespan)
    app.state.router = router

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "prfaas-router"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        report = router.fleet.health_report()
        local_ok = any(i.healthy and i.can_decode for i in router.fleet.of_kind("local"))
        status = 200 if local_ok else 503
        return JSONResponse(
            {
                "status": "ok" if local_ok else "unavailable",
                "instances": report,
                "threshold_tokens": router.controller.t,
            },
            status_code=status,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        router._tick()
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/threshold")
    async def get_threshold() -> dict:
        return {**router.controller.snapshot(), "egress_counters": dict(router.egress.last)}

    @app.put("/admin/threshold")
    async def put_threshold(request: Request) -> Response:
        try:
            body = await request.json()
            tokens = float(body["threshold_tokens"])
            if tokens < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return _error_response(400, 'send {"threshold_tokens": <number >= 0>}')
        router.controller.set_fixed(tokens)
        return JSONResponse(router.controller.snapshot())

    @app.get("/admin/split")
    async def split() -> dict:
        adv = router.controller.advice
        return {
            "advice": None if adv is None else adv.__dict__,
            "applying": router.splitter is not None,
            "switches": [] if router.splitter is None else router.splitter.history[-20:],
            "note": "long-term loop: recommended local prefill/decode instance counts for the observed lengths",
        }

    @app.get("/admin/requests")
    async def requests_(limit: int = 100) -> dict:
        recs = list(router.records.values())[-max(1, min(limit, 10_000)) :]
        return {"requests": [r.as_dict() for r in recs]}

    @app.exception_handler(Exception)
    async def _unhandled(_request: Request, exc: Exception) -> Response:  # pragma: no cover - last resort
        log.exception("unhandled router error: %s", exc)
        return _error_response(502, f"upstream or router failure: {type(exc).__name__}", "upstream_error")

    return RouterApp(router, app)
