"""One placed request, carried out: relay a local request, or run the producer and the consumer
of a disaggregated one, falling back to local prefill when the producer fails.

- local on an instance that prefills and decodes: proxy the request unchanged;
- otherwise: send the producer request and the consumer request *at the same time* (the
  consumer must expect the KV before the first layer is pushed) and stream the consumer's answer
  back. If the producer fails before the consumer answers, the consumer request is cancelled and
  the request is served by local prefill (pd.py says per engine how): the client sees no error.
- a hop whose protocol is sequential (NIXL: the decode reads blocks the producer's answer names)
  sends the producer request first and the consumer request, carrying that answer, after it.

The protocol of each hop is the producing instance's (its cluster's ``transfer``, pd.py).

Every request's hold on an instance is a :class:`~prfaas_plugin.router.lease.Lease`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.protocol.requests import producer_outcome
from prfaas_plugin.router.asgi import Reply
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.egress import EgressMeter
from prfaas_plugin.router.instances import Fleet, Instance
from prfaas_plugin.router.lease import Lease
from prfaas_plugin.router.metrics import RouterMetrics
from prfaas_plugin.router.pd import PDProtocol, fans_out, hop_protocols, warmup_body
from prfaas_plugin.router.policy import Decision
from prfaas_plugin.router.records import Record
from prfaas_plugin.router.replies import engine_gave_up, error_reply, stream_error_event
from prfaas_plugin.router.threshold import ThresholdController
from prfaas_plugin.router.upstream import Stream, Unreachable, Upstream, UpstreamError

log = logging.getLogger("prfaas.router")
T = TypeVar("T")


@dataclass
class ProducerResult:
    ok: bool
    kv_bytes: int = 0
    error: str = ""
    seconds: float = 0.0
    #: Sequential protocols: what the consumer request carries (``PDProtocol.handoff``).
    handoff: dict[str, Any] | None = None
    #: The HTTP status of the refusal that failed it (the producer's, or the decode's where a
    #: decode error means a failed transfer); 0: no HTTP answer (unreachable, cancelled, ...).
    status: int = 0


@dataclass
class Opened:
    """An upstream answer whose status line arrived, and the hold on its instance."""

    resp: Stream
    lease: Lease

    async def discard(self) -> None:
        await self.resp.aclose()
        self.lease.release()


class Flow:
    def __init__(
        self,
        cfg: RouterConfig,
        client: Upstream,
        fleet: Fleet,
        index: PrefixIndex,
        controller: ThresholdController,
        egress: EgressMeter,
        metrics: RouterMetrics,
        pd: PDProtocol,
    ) -> None:
        self.cfg, self.client, self.fleet, self.index = cfg, client, fleet, index
        self.controller, self.egress, self.metrics, self.pd = controller, egress, metrics, pd
        self.hops = hop_protocols(pd)

    def pd_for(self, d: Decision) -> PDProtocol:
        """The protocol of ``d``'s hop: its producer's (config.py validated the choice)."""
        return self.pd if d.prefill is None else self.hops[d.prefill.transfer]

    # -- entry ------------------------------------------------------------------------------------
    async def run(
        self, path: str, body: dict, d: Decision, rec: Record, tokens: list[int], stream: bool, arrived: float
    ) -> Reply:
        headers = {
            "x-request-id": rec.request_id,
            "x-prfaas-route": d.route,
            "x-prfaas-uncached-tokens": str(d.l_uncached),
            "x-prfaas-threshold": f"{d.threshold:.0f}",
        }
        if d.prefill is None:
            op = await self.open(d.decode, path, body)
            if op.resp.status_code == 200:
                self.index.record(d.decode.url, tokens)
            return await self.relay(op, rec, headers, arrived, stream)
        if fans_out(body) and self.pd_for(d).decode_prefills_alone(d.decode):
            return await self._prefill_then_fan_out(path, body, d, rec, tokens, stream, headers, arrived)
        return await self._two_phase(path, body, d, rec, tokens, stream, headers, arrived)

    async def _prefill_then_fan_out(
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
        """``n`` > 1 on a disaggregated route: prefill once, then let the decode instance fan out.

        The KV of one sample cannot be pushed into n requests (each of vLLM's n child requests
        would wait for a transfer of its own). So the prompt is first carried over as a one-token
        request (the usual producer + consumer, fallback included), which leaves its KV in the
        decode instance's prefix cache; then the client's own request goes to that instance,
        which finds the prompt cached and samples n answers from it. If the cache lost the blocks
        meanwhile, the decode instance recomputes them: slower, still correct."""
        warm = await self._two_phase(path, warmup_body(body), d, rec, tokens, False, headers, arrived, account=False)
        if warm.status != 200:
            return warm  # the decode instance refused the request: its answer is the client's
        headers = {**headers, "x-prfaas-fan-out": "after-prefill"}
        op = await self.open(d.decode, path, body)
        return await self.relay(op, rec, headers, arrived, stream)

    # -- producer + consumer ------------------------------------------------------------------------
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
        account: bool = True,
    ) -> Reply:
        assert d.prefill is not None
        pd = self.pd_for(d)
        if pd.sequential:
            return await self._handoff_then_decode(pd, path, body, d, rec, tokens, stream, headers, arrived, account)
        prod_body, cons_body, rec.transfer_id = pd.bodies(body, d.prefill, d.decode)
        producer: Instance = d.prefill
        prod_task = self._leased_task(producer, lambda lease: self._produce(producer, path, prod_body, lease))
        pending: list[asyncio.Task[Any]] = []
        op: Opened | None = None
        consumer_handled = False  # its answer is ours to close, or was closed already
        try:
            cons_task = self._leased_task(d.decode, lambda lease: self.open(d.decode, path, cons_body, lease))
            pending.append(cons_task)
            got = await _unless_producer_fails(cons_task, prod_task)
            consumer_handled = True
            if got is _PRODUCER_FAILED:
                return await self._fallback(path, body, d, rec, prod_task.result(), stream, headers, arrived, account)
            op = got
            first: bytes | None = None
            chunks: AsyncIterator[bytes] | None = None
            if stream and op.resp.status_code == 200:
                # A streaming answer has its status line at once; its first chunk only comes
                # after the KV landed. A producer failure before that still falls back cleanly.
                chunks = op.resp.aiter_raw()
                first_task = asyncio.create_task(_next_chunk(chunks))
                pending.append(first_task)
                got = await _unless_producer_fails(first_task, prod_task)
                if got is _PRODUCER_FAILED:
                    await op.discard()
                    op = None
                    return await self._fallback(
                        path, body, d, rec, prod_task.result(), stream, headers, arrived, account
                    )
                first = got
            elif op.resp.status_code != 200 and (
                pd.decode_error_is_transfer_failure() or (prod_task.done() and not prod_task.result().ok)
            ):
                # Nothing reached the client yet: the same fallback as a failed producer.
                if not prod_task.done():
                    prod_task.cancel()
                    await asyncio.wait((prod_task,))  # not ``await``: a cancellation of ours must propagate
                prod = (
                    prod_task.result()
                    if prod_task.done() and not prod_task.cancelled()
                    else ProducerResult(False, error="cancelled")
                )
                if prod.ok or not prod.status:
                    # The decode's refusal is the answer (the producer's, cut short or never
                    # refused, says nothing more): its status decides a 4xx or a fallback.
                    prod = ProducerResult(
                        False,
                        error=f"decode HTTP {op.resp.status_code}" + ("" if prod.ok else f" (producer: {prod.error})"),
                        seconds=prod.seconds,
                        status=op.resp.status_code,
                    )
                await op.resp.aread()
                await op.discard()
                op = None
                return await self._fallback(path, body, d, rec, prod, stream, headers, arrived, account)
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
                op = pending[0].result()  # cancelled as the consumer's answer came: close it too
            if op is not None:
                await op.discard()
            raise
        self._finish_producer_later(prod_task, d, rec, tokens)
        return await self.relay(op, rec, headers, arrived, stream, first=first, chunks=chunks, account=account)

    async def _handoff_then_decode(
        self,
        pd: PDProtocol,
        path: str,
        body: dict,
        d: Decision,
        rec: Record,
        tokens: list[int],
        stream: bool,
        headers: dict,
        arrived: float,
        account: bool,
    ) -> Reply:
        """A sequential hop (NIXL): the producer prefills and answers where its blocks are; then
        the consumer request carries that answer and its connector reads them. A producer that
        fails, or answers nothing to hand on, falls back like in the concurrent flow. A client
        that leaves during the prefill cancels the producer request (vLLM aborts it and frees its
        blocks); once the producer answered, its blocks wait for the decode's read, and if the
        consumer request never reaches the decode they are freed by NIXL's own timeout."""
        assert d.prefill is not None
        prod_body, cons_body, rec.transfer_id = pd.bodies(body, d.prefill, d.decode)
        producer: Instance = d.prefill
        prod_task = self._leased_task(producer, lambda lease: self._produce(producer, path, prod_body, lease, pd))
        prod = await prod_task  # a cancellation of ours cancels the producer request too
        if not prod.ok or prod.handoff is None:
            return await self._fallback(path, body, d, rec, prod, stream, headers, arrived, account)
        rec.transfer_id = str(prod.handoff.get("remote_request_id", ""))
        self._finish_producer_later(prod_task, d, rec, tokens)
        op = await self.open(d.decode, path, pd.consumer_body(cons_body, prod.handoff))
        return await self.relay(op, rec, headers, arrived, stream, account=account)

    def _finish_producer_later(
        self, prod_task: asyncio.Task[ProducerResult], d: Decision, rec: Record, tokens: list[int]
    ) -> None:
        def _done(task: asyncio.Task[ProducerResult]) -> None:
            if task.cancelled():
                return
            if task.exception() is not None:  # the decode's answer is relayed all the same
                rec.transfer_status = f"failed: {task.exception()!r}"
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
                        nbytes = rec.kv_bytes_estimated = self.estimated_kv_bytes(d, tokens)
                        self.metrics.egress_estimated.inc(nbytes)
                    self.controller.record_egress(nbytes)
                self.index.record(d.prefill.url, tokens)
                self.index.record(d.decode.url, tokens)
                self.metrics.kv_bytes.labels(d.route).inc(res.kv_bytes)

        if prod_task.done():
            _done(prod_task)
        else:
            prod_task.add_done_callback(_done)

    def estimated_kv_bytes(self, d: Decision, tokens: list[int]) -> int:
        """KV bytes a transfer to ``d.decode`` carried: the prompt beyond the prefix that decode
        instance holds (not ``d.l_uncached``: in abundant mode that is counted against the
        PrfaaS side's cache, and the decode was picked by load). Call before this request's own
        tokens are recorded for the decode."""
        held = self.index.longest_prefix(tokens, [d.decode.url])[0] if tokens else 0
        return self.controller.predicted_kv_bytes(max(0, d.l_total - held))

    async def _produce(
        self, inst: Instance, path: str, body: dict, lease: Lease | None = None, pd: PDProtocol | None = None
    ) -> ProducerResult:
        """Run the producer request. With a sequential ``pd``, a successful answer must also
        carry what the consumer request needs (``PDProtocol.handoff``), or it counts as failed."""
        t0 = time.monotonic()
        with lease or Lease(inst, self.metrics.queue):
            try:
                status, parsed, text = await self.client.post_json(
                    f"{inst.url}{path}", body, self.cfg.timeouts.prefill_s
                )
            except UpstreamError as exc:
                if isinstance(exc, Unreachable):
                    inst.healthy, inst.last_error = False, f"unreachable: {exc}"
                return ProducerResult(False, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - t0)
            if status != 200:
                return ProducerResult(
                    False, error=f"producer HTTP {status}: {text[:200]}", seconds=time.monotonic() - t0, status=status
                )
            out = producer_outcome(parsed)
            handoff = None
            if out.ok and pd is not None and pd.sequential:
                try:
                    handoff = pd.handoff(parsed)
                except ValueError as exc:
                    return ProducerResult(False, error=str(exc), seconds=time.monotonic() - t0)
            return ProducerResult(out.ok, out.kv_bytes, out.error, time.monotonic() - t0, handoff)

    # -- fallback ------------------------------------------------------------------------------------
    async def _fallback(
        self,
        path: str,
        body: dict,
        d: Decision,
        rec: Record,
        prod: ProducerResult,
        stream: bool,
        headers: dict,
        arrived: float,
        account: bool = True,
    ) -> Reply:
        reason = "prfaas failed" if d.route == "prfaas" else "local producer failed"
        rec.fallback = f"{reason}: {prod.error}"
        rec.transfer_status = f"failed: {prod.error}"
        self.metrics.fallbacks.labels(reason).inc()
        headers = {**headers, "x-prfaas-fallback": reason}
        if not self.pd_for(d).decode_prefills_alone(d.decode):
            # The decode instance cannot prefill on its own: pair it with a local prefill
            # instance of its cluster (another one than the prefill that just failed).
            local = [
                i
                for i in self.fleet.in_cluster(d.decode.cluster)
                if i.can_prefill and i.routable and i is not d.prefill
            ]
            if not local:
                if 400 <= prod.status < 500:
                    # The engine refused the request itself (a client mistake, or a limit): any
                    # other instance would too, so that answer is the client's, not a 502.
                    return error_reply(prod.status, f"the engine refused the request: {prod.error}")
                return error_reply(
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
            assert again.prefill is not None
            log.warning(
                "request_id=%s falling back to local prefill %s -> %s: %s",
                rec.request_id,
                again.prefill.url,
                d.decode.url,
                prod.error,
            )
            prod_body, cons_body, rec.transfer_id = self.pd_for(again).bodies(body, again.prefill, d.decode)
            producer: Instance = again.prefill
            prod_task = self._leased_task(producer, lambda lease: self._produce(producer, path, prod_body, lease))
            try:
                op = await self.open(d.decode, path, cons_body)
            except BaseException:
                prod_task.cancel()
                raise
            self._finish_producer_later(prod_task, again, rec, [])
            return await self.relay(op, rec, headers, arrived, stream, account=account)
        log.warning("request_id=%s falling back to local prefill on %s: %s", rec.request_id, d.decode.url, prod.error)
        op = await self.open(d.decode, path, body)
        return await self.relay(op, rec, headers, arrived, stream, account=account)

    # -- HTTP plumbing -----------------------------------------------------------------------------
    def _leased_task(self, inst: Instance, make: Callable[[Lease], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """``make(lease)`` as a task, with the lease on ``inst`` taken now rather than when the task
        first runs: requests placed in the same turn of the event loop then see each other's load
        (two arrivals together would otherwise both pick the same least-loaded instance). A task
        cancelled before it ran, or failed, gives the lease back here; release is idempotent."""
        lease = Lease(inst, self.metrics.queue)
        task = asyncio.create_task(make(lease))

        def settle(t: asyncio.Task[T]) -> None:
            if t.cancelled() or t.exception() is not None:
                lease.release()

        task.add_done_callback(settle)
        return task

    async def open(self, inst: Instance, path: str, body: dict, lease: Lease | None = None) -> Opened:
        """Send a request and return once the status line arrived (the body streams later)."""
        lease = lease or Lease(inst, self.metrics.queue)
        try:
            return Opened(await self.client.open(f"{inst.url}{path}", body), lease)
        except BaseException:
            lease.release()
            raise

    async def relay(
        self,
        op: Opened,
        rec: Record,
        headers: dict,
        arrived: float,
        stream: bool,
        first: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
        account: bool = True,
    ) -> Reply:
        """Pass the upstream answer through; account TTFT, load and the outcome (``account``
        False: an intermediate answer the client never sees, read whole and only released)."""
        resp = op.resp
        if not account:
            try:
                content = await resp.aread()
            finally:
                await op.discard()
            return Reply(resp.status_code, {**headers, "content-type": resp.headers.get("content-type", "")}, content)
        rec.status = resp.status_code
        out_headers = {**headers, "content-type": resp.headers.get("content-type", "application/json")}

        def close_accounting(outcome: str, served: bool = True) -> None:
            op.lease.release(served=served)
            rec.total_s = time.monotonic() - arrived
            self.metrics.requests.labels(rec.route, outcome).inc()

        if not stream or resp.status_code != 200:
            try:
                content = await resp.aread()
            except BaseException:
                await op.discard()  # the caller counts the outcome (upstream error, client gone)
                raise
            await resp.aclose()
            if resp.status_code == 200 and (why := engine_gave_up(content)) is not None:
                rec.status = 502
                rec.error = f"instance {op.lease.inst.url} ended the request itself (finish_reason {why!r})"
                close_accounting("upstream_error", served=False)
                return error_reply(502, rec.error, "upstream_error", rec.request_id)
            rec.ttft_s = time.monotonic() - arrived
            self.overhead(rec, resp, arrived, resp.done_at)
            close_accounting("ok" if resp.status_code == 200 else f"http_{resp.status_code}")
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
                    self.overhead(rec, resp, arrived, resp.first_body_at)  # resumed once it was written
                async for chunk in it:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.monotonic() - arrived
                        self.metrics.ttft.labels(rec.route, "total").observe(rec.ttft_s)
                        yield chunk
                        self.overhead(rec, resp, arrived, resp.first_body_at)
                    else:
                        yield chunk
            except asyncio.CancelledError:
                outcome = "client_disconnected"
                rec.error = "client disconnected"
                raise
            except UpstreamError as exc:
                outcome = "upstream_error"
                rec.error = f"{type(exc).__name__}: {exc}"
                rec.status = 502
                yield stream_error_event(
                    502, f"instance {op.lease.inst.url} failed mid-answer: {exc}", "upstream_error", rec.request_id
                )
            finally:
                await resp.aclose()  # closing the upstream stream makes vLLM abort the request
                close_accounting(outcome)

        return Reply(200, out_headers, stream=body_iter())

    def overhead(self, rec: Record, resp: Stream, arrived: float, answer_at: float) -> None:
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


async def _unless_producer_fails(task: asyncio.Task[Any], prod_task: asyncio.Task[ProducerResult]) -> Any:
    """``task``'s result, or ``_PRODUCER_FAILED`` (``task`` cancelled) if the producer failed
    first. An upstream answer that ``task`` opened before the cancel is discarded (closed, and
    its lease released)."""
    done, _ = await asyncio.wait({task, prod_task}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done and not prod_task.result().ok:
        task.cancel()
        await asyncio.wait((task,))  # not ``await task``: a cancellation of ours must propagate
        if not task.cancelled() and task.exception() is None:
            made = task.result()
            if isinstance(made, Opened):
                await made.discard()
            elif isinstance(made, Stream):
                await made.aclose()
        return _PRODUCER_FAILED
    return await task
