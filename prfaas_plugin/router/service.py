"""The router: its state (fleet, prefix index, threshold controller, records), its lifecycle,
and one completion request from body to answer -- parse and validate, tokenise, place
(policy.py), carry out (flow.py). HTTP lives in app.py and asgi.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.router.asgi import (
    BodyTooLarge,
    ClientGone,
    Receive,
    Reply,
    Scope,
    Send,
    client_gone,
    header,
    read_body,
    send_reply,
)
from prfaas_plugin.router.auth import Auth
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.egress import EgressMeter
from prfaas_plugin.router.flow import Flow
from prfaas_plugin.router.gcpace import GcPacer
from prfaas_plugin.router.instances import Fleet
from prfaas_plugin.router.loops import ControlLoops
from prfaas_plugin.router.metrics import RouterMetrics
from prfaas_plugin.router.pd import needs_prompt_logprobs, pd_protocol
from prfaas_plugin.router.policy import Decision, NoInstance, bandwidth_mode, decide, prfaas_overloaded
from prfaas_plugin.router.rebalance import SplitApplier
from prfaas_plugin.router.records import RecentShare, Record, RecordBook
from prfaas_plugin.router.replies import ClientError, error_reply, router_fault
from prfaas_plugin.router.threshold import ThresholdController
from prfaas_plugin.router.tokenize import PromptError, PromptTokenizer
from prfaas_plugin.router.upstream import Unreachable, Upstream, UpstreamError
from prfaas_plugin.router.validate import parse_body, validate_completion

log = logging.getLogger("prfaas.router")

#: A client's own X-Request-Id is kept if it looks like an id; anything else (control bytes,
#: kilobytes of text) would be echoed into response headers and log lines, so it is replaced.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(scope: Scope) -> str:
    rid = header(scope, b"x-request-id")
    if rid is not None and _REQUEST_ID.fullmatch(rid):
        return rid
    return os.urandom(16).hex()  # as uuid4().hex, 4x cheaper


#: Request bodies up to this size are tokenised inline on the event loop (see Router._tokenize).
INLINE_TOKENIZE_BYTES = 8 << 10


@dataclass
class Router:
    cfg: RouterConfig
    tokenizer: PromptTokenizer
    fleet: Fleet = field(init=False)
    index: PrefixIndex = field(init=False)
    controller: ThresholdController = field(init=False)
    metrics: RouterMetrics = field(init=False)
    client: Upstream | None = None
    peer_client: Upstream | None = None  # to the other router replicas (their /admin/lengths)

    def __post_init__(self) -> None:
        self.auth = Auth(self.cfg.auth)  # reads the keys: a missing file or variable fails here
        self.fleet = Fleet.from_config(self.cfg)
        self.index = PrefixIndex(self.cfg.block_size, own_record=self.cfg.replicas.prefix_source != "events")
        self.controller = ThresholdController(self.cfg.threshold, self.cfg.link_gbps)
        self.metrics = RouterMetrics()
        self.records = RecordBook()
        self.recent_routes = RecentShare(256, "prfaas")
        self.pd = pd_protocol(self.cfg.engine, self.cfg.transfer_deadline_s)
        self.egress = EgressMeter()
        self._subscribers: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._serving = 0  # completion requests open now (the GC pacer idles at 0)
        g = self.cfg.gc
        self.gc_pacer = (
            GcPacer(g.young_every_ms / 1e3, g.middle_every, g.full_every_s, g.idle_every_s)
            if g.young_every_ms > 0
            else None
        )
        self.loops = ControlLoops(
            self.cfg, self.fleet, self.index, self.controller, self.egress, self.metrics, self.gc_pacer
        )
        self.flow: Flow | None = None

    @property
    def splitter(self) -> SplitApplier | None:
        return self.loops.splitter

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        t = self.cfg.timeouts
        self.client = Upstream(t.connect_s, t.request_s, t.keepalive_s, self.auth.upstream_key)
        await self.client.start()
        self.flow = Flow(
            self.cfg, self.client, self.fleet, self.index, self.controller, self.egress, self.metrics, self.pd
        )
        await self.fleet.check_health(self.client, t.health_timeout_s)  # at start, one slow probe decides
        for inst in self.fleet.instances:
            if not inst.healthy:
                log.warning("at start, instance %s (%s) is unreachable: %s", inst.url, inst.cluster, inst.last_error)
        self._start_event_feeds()
        # Peers are other routers, not engines: they take this router's admin key, not the engines' key.
        self.peer_client = Upstream(t.connect_s, t.request_s, t.keepalive_s, self.auth.peer_key)
        await self.peer_client.start()
        self.loops.start(self.client, self.peer_client, self._tasks)
        if self.gc_pacer is not None:
            self._tasks.append(asyncio.create_task(self.gc_pacer.run(lambda: self._serving == 0)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in self._subscribers:
            sub.stop()
        for client in (self.client, self.peer_client):
            if client is not None:
                await client.close()

    def _start_event_feeds(self) -> None:
        feeds = [i for i in self.fleet.instances if i.kv_events]
        if not feeds or self.cfg.replicas.prefix_source == "own":
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

    def bandwidth_mode(self) -> str:
        return bandwidth_mode(self.cfg.bandwidth_mode, self.controller.utilisation(), self.cfg.threshold.egress_low)

    # -- one request ------------------------------------------------------------------------------
    async def _tokenize(self, body_bytes: int, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """Short prompts are tokenised on the event loop: handing a job of tens of microseconds
        to a worker thread costs more than the job, and under load each hand-off waits for the
        GIL (up to its switch interval). Long prompts (milliseconds of work) go to a thread so the
        loop keeps relaying the other streams."""
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

    async def passthrough(self, scope: Scope, receive: Receive, send: Send, method: bytes) -> None:
        """``/tokenize``, ``/detokenize``, ``/version``: an engine's own answer, from a healthy
        local instance (the model and tokenizer are the same everywhere)."""
        rid = request_id(scope)
        body = None
        try:
            if method == b"POST":
                raw = await read_body(scope, receive, self.cfg.body_limit)
                body = parse_body(raw)
                if not isinstance(body, dict):
                    raise ClientError(400, "the request body must be a JSON object")
                if "model" in body and body["model"] != self.cfg.model:
                    raise ClientError(404, f"the model {body['model']!r} does not exist", "model_not_found")
        except ClientGone:
            return
        except BodyTooLarge as exc:
            reply = error_reply(413, f"{exc} (router config: max_body_bytes)", request_id=rid)
            reply.headers["connection"] = "close"  # the rest of the body is not read
            await send_reply(reply, send)
            return
        except ClientError as exc:
            await send_reply(error_reply(exc.status, exc.message, exc.code), send)
            return
        candidates = sorted(
            (i for i in self.fleet.instances if i.routable),
            key=lambda i: (i.cluster_kind != "local", i.inflight),
        )
        if not candidates:
            await send_reply(error_reply(503, "no healthy instance", "service_unavailable"), send)
            return
        inst = candidates[0]
        assert self.client is not None
        try:
            status, headers, content = await self.client.call(
                method, f"{inst.url}{scope['path']}", body, self.cfg.timeouts.connect_s + 30
            )
        except UpstreamError as exc:
            reply = error_reply(502, f"instance {inst.url} failed: {exc}", "upstream_error", rid)
        else:
            reply = Reply(status, {"content-type": headers.get("content-type", "application/json")}, content)
        await send_reply(reply, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, path: str, chat: bool, arrived: float) -> None:
        rid = request_id(scope)
        try:
            raw = await read_body(scope, receive, self.cfg.body_limit)
        except ClientGone:
            return
        except BodyTooLarge as exc:
            reply = error_reply(413, f"{exc} (router config: max_body_bytes)", "invalid_request_error", rid)
            reply.headers["connection"] = "close"  # the rest of the body is not read
            await send_reply(reply, send)
            return
        # One watcher for the client leaving, for the request's whole life: while the work runs
        # (handle) and while its answer streams (send_reply).
        gone = asyncio.ensure_future(client_gone(receive))
        try:
            try:
                reply = await self.handle(raw, gone, path, chat, rid, arrived)
            except Exception as exc:
                log.exception("request_id=%s: unhandled router error: %s", rid, exc)
                reply = router_fault(rid, exc)
            await send_reply(reply, send, gone)
        finally:
            if gone.done():
                if not gone.cancelled():
                    gone.exception()  # retrieved: a server that failed receive() is not our error to log
            else:
                gone.cancel()

    async def handle(
        self, raw: bytes, gone: asyncio.Future[Any], path: str, chat: bool, rid: str, arrived: float
    ) -> Reply:
        """The answer to one request; ``gone`` completes if the client leaves meanwhile."""
        try:
            body = validate_completion(parse_body(raw), chat, self.cfg.model)
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
            return error_reply(exc.status, exc.message, exc.code)
        except PromptError as exc:
            return error_reply(400, str(exc))
        stream = bool(body.get("stream", False))
        # Until the answer starts, a client that leaves cancels the work here (a remote prefill
        # can take seconds); once a stream flows, send_reply watches for it.
        work = asyncio.create_task(self._route(path, body, tokens, stream, rid, arrived))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()  # the client left: cancelling closes both upstream requests
        await asyncio.wait((work,))  # not ``await``: a cancellation of ours must propagate
        rec = self.records.get(rid)
        if rec is not None:
            rec.error = "client disconnected"
            self.metrics.requests.labels(rec.route, "client_disconnected").inc()
        return Reply(499)

    async def _route(self, path: str, body: dict, tokens: list[int], stream: bool, rid: str, arrived: float) -> Reply:
        # An instance found unreachable at dispatch is marked unhealthy and the request is placed
        # again (at most once per instance): a dead PrfaaS cluster sends work local.
        assert self.flow is not None
        for attempt in range(len(self.fleet.instances) + 1):
            try:
                d, overloaded = self.place(tokens)
            except NoInstance as exc:
                return error_reply(503, str(exc), "service_unavailable")
            if d.prefill is not None and needs_prompt_logprobs(body) and self.pd.decode_prefills_alone(d.decode):
                # Pushed KV carries no logprobs: the answering instance computes the prompt.
                d = dataclasses.replace(d, route="local", prefill=None, reason="prompt logprobs")
            rec = self._record(path, d, rid, stream, arrived, overloaded, attempt)
            try:
                return await self.flow.run(path, body, d, rec, tokens, stream, arrived)
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
                rec.status, rec.error = 502, f"{type(exc).__name__}: {exc}"
                return error_reply(502, f"instance {d.decode.url} failed: {exc}", "upstream_error", rid)
        return error_reply(503, "no reachable instance", "service_unavailable")

    def place(self, tokens: list[int]) -> tuple[Decision, bool]:
        """The decision for ``tokens`` now, and whether the PrfaaS side counted as overloaded
        (no side effects: ``/admin/decide`` asks it too)."""
        overloaded = prfaas_overloaded(self.fleet.of_kind("prfaas"), self.cfg.threshold.queue_high)
        d = decide(tokens, self.fleet, self.index, self.controller.t, self.bandwidth_mode(), exclude_prfaas=overloaded)
        return d, overloaded

    def _record(
        self, path: str, d: Decision, rid: str, stream: bool, arrived: float, overloaded: bool, rerouted: int
    ) -> Record:
        """Remember a placement and count it (metrics, the controller's length sample, the log)."""
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
        self.records.add(rec)
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
        return rec
