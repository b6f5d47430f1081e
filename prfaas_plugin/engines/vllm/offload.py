"""Decode-initiated offload: the network half of the in-engine offload decision.

The scheduler half of the connector (scheduler.py) decides, per new request, from the exact
number of tokens its prefix cache holds. When it offloads, the request must go to a PrfaaS
prefill instance as the router would send it (the producer body of request protocol v1,
docs/protocol.md) -- but vLLM's scheduler loop runs every engine step and must never wait on a
socket. So this module owns one daemon thread with an asyncio loop; the scheduler hands it a
job with ``loop.call_soon_threadsafe`` (a few microseconds) and goes on. What comes back:

- the KV itself, through the transfer receiver of this instance, as for a router-driven load
  (the worker half reports it through vLLM's ``finished_recving``);
- a failed prefill (instance unreachable, HTTP error, failed outcome, past the deadline), as a
  request id on :attr:`Offloader.failed`, which the scheduler half drains each step to stop
  the pending load at once (the request then prefills locally) rather than at the deadline.

The same thread reads the fleet's threshold from a router's ``/admin/threshold`` (one t for
router and engines; a stale or missing reading falls back to a fixed value) and the PrfaaS
instances' queue gauges (their ``/metrics``), which with this instance's own open offloads and
a prefix index of what it sent where choose the instance for each request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from prfaas_plugin.engines.vllm.options import OffloadOptions
from prfaas_plugin.fleet.engine_metrics import engine_queue
from prfaas_plugin.fleet.prefix_index import PrefixIndex
from prfaas_plugin.protocol.requests import producer_outcome

log = logging.getLogger("vllm.prfaas")  # child of vLLM's logger: same handlers and format

#: Keys the affinity index keeps (LRU beyond): about 16 MB of keys.
_INDEX_CAPACITY = 200_000


def _env_key(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"offload.{what}: the environment variable {name} is unset or empty")
    return value


class ThresholdSource:
    """t for the offload decision: the router's last reading while it is fresh, else the fixed
    fallback. Read by the scheduler on every new request (a float and a clock read), written by
    the background thread."""

    def __init__(self, fallback: float, stale_s: float, clock: Any = time.monotonic) -> None:
        self.fallback, self.stale_s, self.clock = float(fallback), stale_s, clock
        self._reading: tuple[float, float] | None = None  # (tokens, read at); one tuple: atomic swap
        self._was_fresh: bool | None = None  # None: not told yet (the first state is logged too)

    def set(self, tokens: float, at: float | None = None) -> None:
        self._reading = (float(tokens), self.clock() if at is None else at)

    def current(self) -> tuple[float, bool]:
        """(t, True when it is the router's fresh reading)."""
        r = self._reading
        fresh = r is not None and self.clock() - r[1] <= self.stale_s
        return (r[0], True) if fresh and r is not None else (self.fallback, False)

    def note_staleness(self) -> None:
        """One log line when the router's reading goes stale or comes back (background thread)."""
        _, fresh = self.current()
        if fresh != self._was_fresh:
            if fresh:
                log.info("prfaas offload: threshold now read from the router")
            else:
                log.warning(
                    "prfaas offload: no fresh threshold from the router (none read in the last %.0f s); "
                    "using the fixed %.0f tokens",
                    self.stale_s,
                    self.fallback,
                )
            self._was_fresh = fresh


@dataclass
class PrefillInstance:
    url: str
    inflight: int = 0  # this instance's offloads open there
    reported: int | None = None  # its own queue gauges at the last read (None: not read / stale)
    reported_at: float = 0.0
    down_until: float = 0.0
    last_error: str = ""

    def load(self, now: float, stale_s: float) -> int:
        """Its queue as it last reported it (which counts this instance's offloads there), never
        below the offloads this instance has open there now."""
        seen = self.reported if self.reported is not None and now - self.reported_at <= stale_s else 0
        return max(self.inflight, seen)


@dataclass
class Job:
    """One offloaded request as the scheduler hands it over. ``request`` is vLLM's Request: its
    prompt ids are read on the background thread (a consumer's prompt never changes), so the
    scheduler does not copy a long prompt."""

    req_id: str
    request: Any
    producer_params: dict[str, Any]
    deadline_s: float
    cache_salt: str | None = None
    started: float = field(default_factory=time.monotonic)


class Offloader:
    """Owns the background thread. Public methods are called from the scheduler thread."""

    def __init__(self, opts: OffloadOptions, block_size: int, clock: Any = time.monotonic) -> None:
        self.opts = opts
        self.clock = clock
        self.threshold = ThresholdSource(opts.threshold_tokens, opts.threshold_stale_s, clock)
        self.instances = [PrefillInstance(u) for u in opts.prefill_urls]
        self.index = PrefixIndex(block_size, capacity=_INDEX_CAPACITY)
        self._router_key = _env_key(opts.threshold_key_env, "threshold_key_env")
        self._api_key = _env_key(opts.api_key_env, "api_key_env")
        #: (request id, failure kind, detail) of remote prefills that failed: the scheduler drains it
        self.failed: collections.deque[tuple[str, str, str]] = collections.deque()
        self._lock = threading.Lock()
        self._open = 0  # offloads handed over and not finished (all instances)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prfaas-offload", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("prfaas offload: the background thread did not start")

    # -- scheduler thread ----------------------------------------------------------------------
    def has_capacity(self) -> bool:
        """Some PrfaaS instance is up and below ``max_inflight`` (as this instance counts)."""
        now = self.clock()
        up = sum(1 for i in self.instances if i.down_until <= now)
        return up > 0 and self._open < up * self.opts.max_inflight

    def submit(self, job: Job) -> None:
        with self._lock:
            self._open += 1
        self._loop.call_soon_threadsafe(self._start, job)

    def cancel(self, req_id: str) -> None:
        """The request finished here (answered, aborted): drop its remote prefill if still open;
        closing the connection makes the PrfaaS vLLM abort it and free its blocks."""
        self._loop.call_soon_threadsafe(self._cancel, req_id)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # -- background thread ---------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        pollers = [self._loop.create_task(self._poll_threshold())]
        if self.opts.load_scrape_s > 0:
            pollers.append(self._loop.create_task(self._poll_loads()))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            for t in [*pollers, *self._tasks.values()]:
                t.cancel()
            self._loop.run_until_complete(asyncio.gather(*pollers, *self._tasks.values(), return_exceptions=True))
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()

    def _start(self, job: Job) -> None:
        self._tasks[job.req_id] = self._loop.create_task(self._offload(job))

    def _cancel(self, req_id: str) -> None:
        task = self._tasks.get(req_id)
        if task is not None:
            task.cancel()

    def _headers(self, key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"} if key else {}

    def choose(self, tokens: Sequence[int], now: float) -> PrefillInstance | None:
        """The instance holding the longest prefix of ``tokens`` (as far as this instance sent
        them), unless it is full; else the least loaded. None when every instance is down."""
        up = [i for i in self.instances if i.down_until <= now]
        if not up:
            return None
        stale = 3 * max(self.opts.load_scrape_s, 1.0)
        open_ = [i for i in up if i.inflight < self.opts.max_inflight] or up
        _, holder = self.index.longest_prefix(tokens, [i.url for i in open_])
        for i in open_:
            if i.url == holder:
                return i
        return min(open_, key=lambda i: (i.load(now, stale), i.url))

    async def _offload(self, job: Job) -> None:
        inst: PrefillInstance | None = None
        kind = error = ""
        try:
            tokens = list(job.request.prompt_token_ids)
            inst = self.choose(tokens, self.clock())
            if inst is None:
                kind, error = "no_instance", "every PrfaaS instance is down"
                return
            inst.inflight += 1
            body: dict[str, Any] = {
                "prompt": tokens,
                "max_tokens": 1,
                "temperature": 0,
                "stream": False,
                "kv_transfer_params": job.producer_params,
            }
            if self.opts.model:
                body["model"] = self.opts.model
            if job.cache_salt:
                body["cache_salt"] = job.cache_salt
            left = job.deadline_s - (self.clock() - job.started)
            assert self._client is not None
            try:
                r = await self._client.post(
                    f"{inst.url}/v1/completions",
                    json=body,
                    headers=self._headers(self._api_key),
                    timeout=max(0.1, left),
                )
            except httpx.ConnectError as exc:
                inst.down_until = self.clock() + self.opts.retry_after_s
                kind, error = "unreachable", f"unreachable: {exc}"
                inst.last_error = error
                return
            except httpx.TimeoutException:
                kind, error = "timeout", f"no answer within the {job.deadline_s:g} s deadline"
                return
            except httpx.HTTPError as exc:  # reset mid-answer: the instance went away
                inst.down_until = self.clock() + self.opts.retry_after_s
                kind, error = "connection_lost", f"{type(exc).__name__}: {exc}"
                inst.last_error = error
                return
            if r.status_code != 200:
                kind, error = "http_error", f"HTTP {r.status_code}: {r.text[:200]}"
                return
            try:
                parsed = r.json()
            except ValueError:
                parsed = None
            out = producer_outcome(parsed)
            if not out.ok:
                kind, error = "transfer_failed", out.error
                return
            self.index.record(inst.url, tokens)
        except asyncio.CancelledError:
            kind = error = ""  # the request finished here first: nothing to report
        except Exception as exc:  # never let a job die silently: the load would wait out its deadline
            kind, error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            if inst is not None:
                inst.inflight -= 1
            with self._lock:
                self._open -= 1
            self._tasks.pop(job.req_id, None)
            if error:
                where = inst.url if inst is not None else "no instance"
                self.failed.append((job.req_id, kind, f"{where}: {error}"))

    async def _poll_threshold(self) -> None:
        url = self.opts.threshold_url
        while True:
            if url is not None:
                assert self._client is not None
                try:
                    r = await self._client.get(
                        f"{url}/admin/threshold",
                        headers=self._headers(self._router_key),
                        timeout=max(1.0, self.opts.threshold_refresh_s),
                    )
                    tokens = r.json().get("threshold_tokens") if r.status_code == 200 else None
                    if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and math.isfinite(tokens):
                        self.threshold.set(max(0.0, float(tokens)))
                    elif r.status_code != 200:
                        log.debug("prfaas offload: router threshold read: HTTP %d", r.status_code)
                except (httpx.HTTPError, ValueError, AttributeError) as exc:
                    log.debug("prfaas offload: router threshold read failed: %s", exc)
                self.threshold.note_staleness()
            await asyncio.sleep(self.opts.threshold_refresh_s)

    async def _poll_loads(self) -> None:
        while True:
            for inst in self.instances:
                assert self._client is not None
                try:
                    r = await self._client.get(
                        f"{inst.url}/metrics", headers=self._headers(self._api_key), timeout=self.opts.load_scrape_s
                    )
                except httpx.HTTPError:
                    continue
                value = engine_queue(r.text) if r.status_code == 200 else None
                if value is not None:
                    inst.reported, inst.reported_at = value, self.clock()
                    if inst.down_until > self.clock():
                        inst.down_until = 0.0  # it answers again: try it with the next request
            await asyncio.sleep(self.opts.load_scrape_s)
