"""HTTP/1.1 to the engines: asyncio protocols and httptools' parser, with a keep-alive pool.

Why not a general client: every streamed token the router relays crosses this code, and at 200
concurrent decoding streams the router's CPU per request sets its added latency (it queues
behind the other streams' chunks). A general client's per-request set-up and per-chunk reader
path cost about a third more CPU than this module (bench/router.py). httpx's pool also scanned
every connection per request.
What an engine connection needs is small: POST or GET with a JSON body, a status line and
headers, a body read whole or chunk by chunk, reuse of idle connections, and *closing a request
early* -- dropping the connection is how vLLM and SGLang learn to abort a request.

Semantics kept from the aiohttp version (tests/test_router.py pins them): no connection within
``connect_s`` raises :class:`Unreachable` (nothing was sent, so the router may place the request
elsewhere); a pooled connection that the instance dropped before any answer is retried once on a
fresh one (the keep-alive race); ``request_s`` (or a call's own limit) bounds a request from
send to the end of its body; anything else that goes wrong is an :class:`UpstreamError`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httptools

#: Body bytes buffered per response before the router stops reading that connection (the client
#: behind it is slow); reading resumes once the relay drained the buffer.
READ_HIGH_WATER = 256 << 10
_USER_AGENT = b"prfaas-router"
#: How soon after a request went out on a reused pooled connection a drop with no answer counts
#: as the keep-alive race (the instance closed the idle connection as we reused it, so it never
#: ran the request) and the request is sent again on a fresh connection. The close is already
#: on its way then and arrives within a round trip; a later drop means the instance may have
#: started the request (a prefill), and it is not run twice.
KEEPALIVE_RACE_S = 0.25


class UpstreamError(Exception):
    """The instance did not answer properly (reset, timeout, bad framing)."""


class Unreachable(UpstreamError):
    """No connection could be made: the instance is down or unroutable."""


class _Dropped(UpstreamError):
    """The connection closed before the status line; ``answered``: some bytes had arrived."""

    def __init__(self, message: str, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class Headers(dict):
    """Response headers, names lower-cased; ``get`` takes any case."""

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


@lru_cache(maxsize=4096)
def _target(url: str) -> tuple[tuple[str, str, int], bytes, str]:
    """(origin: scheme, host, port), the request line's target + Host header bytes, and the url
    for messages. Cached: the router sends to a handful of URLs over and over."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UpstreamError(f"not an http(s) url: {url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return (u.scheme, u.hostname, port), f"{path} HTTP/1.1\r\nHost: {u.netloc}\r\n".encode(), url


class Stream:
    """One request's answer: the status line and headers arrived (``open`` returned), the body
    is read with :meth:`aiter_raw` or :meth:`aread`, and :meth:`aclose` ends it -- returning the
    connection to the pool if the body was read to its end, else closing it."""

    def __init__(self, conn: _Connection, url: str) -> None:
        self._conn = conn
        self.url = url
        self.status_code = 0
        self.headers = Headers()
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._eof = False
        self._keep_alive = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: time.monotonic() when the request was written, the first body bytes arrived and the
        #: body ended (0.0: not yet): the router's own share of a request's time is what lies
        #: outside these (Router._overhead).
        self.sent_at = 0.0
        self.first_body_at = 0.0
        self.done_at = 0.0
        #: Seconds this request waited for connections (and for a pooled one that had dropped)
        #: before it was written: the network's time, not the router's.
        self.connect_wait_s = 0.0

    # -- fed by the connection ----------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_head(self, status: int, keep_alive: bool) -> None:
        self.status_code, self._keep_alive = status, keep_alive
        if not self._head.done():
            self._head.set_result(None)

    def _on_body(self, data: bytes) -> None:
        if not self.first_body_at:
            self.first_body_at = time.monotonic()
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _on_complete(self) -> None:
        self.done_at = time.monotonic()
        self._eof = True
        self._cancel_timer()
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self._eof or self._error is not None:
            return
        self._error = exc
        self._cancel_timer()
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved here: open() re-raises it from the future
        self._wake()

    def _on_lost(self, exc: BaseException | None, answered: bool) -> None:
        if self._head.done() and not self._eof and exc is None and self._conn.until_close:
            self._on_complete()  # a body without length or chunking ends when the connection does
            return
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "the server closed the connection"
        self._fail(
            _Dropped(f"{self.url}: {why}", answered)
            if not self._head.done()
            else UpstreamError(f"{self.url}: connection lost mid-answer ({why})")
        )

    def _start_timer(self, seconds: float) -> None:
        self._timer = self._conn.loop.call_later(seconds, self._timed_out, seconds)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, seconds: float) -> None:
        self._timer = None
        self._fail(UpstreamError(f"{self.url}: no complete answer within {seconds:g} s"))
        self._conn.close()

    # -- read by the router -------------------------------------------------------------------
    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (whatever is buffered comes as one piece)."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    if self._conn.transport is not None:
                        self._conn.transport.resume_reading()
                yield data
                continue
            if self._eof:
                return
            if self._error is not None:
                raise self._error
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Release the connection for reuse if the body was read to the end, else drop it
        (the engine sees the disconnect and aborts the request)."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        conn = self._conn
        conn.stream = None
        if self._eof and self._keep_alive and not self._chunks and not conn.lost:
            conn.pool_return()
        else:
            conn.close()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an instance, one request at a time."""

    def __init__(self, pool: _Pool, origin: tuple[str, str, int]) -> None:
        self.pool, self.origin = pool, origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.stream: Stream | None = None
        self.lost = False
        self.answered = False  # bytes arrived for the current request
        self.until_close = False  # the current answer's body is delimited by the connection closing
        self.informational = False  # inside a 1xx answer, which the final one follows
        self.idle_since = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        s = self.stream
        if s is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        self.answered = True
        try:
            assert self.parser is not None  # set to None only once the connection is gone
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            s._fail(UpstreamError(f"{s.url}: bad HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.parser = None  # it holds our callbacks: a cycle that would wait for the collector
        if self.stream is not None:
            self.stream._on_lost(exc, self.answered)
            self.stream = None

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.stream is not None
        self.stream.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        s = self.stream
        assert s is not None and self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An informational answer (100 Continue, 103 Early Hints): the real one follows.
            s.headers.clear()
            self.informational = True
            return
        h = s.headers
        self.until_close = "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()
        s._on_head(status, self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self.stream is not None
        self.stream._on_body(body)

    def on_message_complete(self) -> None:
        assert self.stream is not None
        if self.informational:
            self.informational = False
            return
        self.stream._on_complete()

    # -- pool ---------------------------------------------------------------------------------
    def begin(self, request: bytes, url: str, timeout_s: float) -> Stream:
        assert self.transport is not None
        self.stream = s = Stream(self, url)
        self.answered = False
        try:
            self.transport.write(request)
        except (RuntimeError, OSError) as exc:  # closed under us (uvloop raises RuntimeError)
            self.lost = True
            self.stream = None
            raise _Dropped(f"{url}: connection closed before the request was sent: {exc}", False) from None
        s._start_timer(timeout_s)
        s.sent_at = time.monotonic()
        return s

    def pool_return(self) -> None:
        # The parser stays: it takes the next answer on this connection as a new message.
        self.idle_since = self.loop.time()
        self.pool.put(self)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Idle connections per origin, most recently used first; one older than ``keepalive_s``
    is closed instead of reused (the instance may be closing it: see TimeoutSpec.keepalive_s)."""

    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}

    def _reusable(self, conn: _Connection, now: float) -> bool:
        return (
            not conn.lost
            and conn.transport is not None
            and not conn.transport.is_closing()
            and now - conn.idle_since < self.keepalive_s
        )

    def take(self, origin: tuple[str, str, int], now: float) -> _Connection | None:
        q = self.idle.get(origin)
        while q:
            conn = q.pop()
            if self._reusable(conn, now):
                return conn
            conn.close()
        return None

    def put(self, conn: _Connection) -> None:
        q = self.idle.setdefault(conn.origin, collections.deque())
        q.append(conn)
        while q and not self._reusable(q[0], conn.idle_since):
            q.popleft().close()  # the oldest first: they expire in that order

    def close_all(self) -> None:
        for q in self.idle.values():
            while q:
                q.popleft().close()


def _abandon(task: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]]) -> None:
    """Give up a connection attempt: cancel it, and close the connection if it was made anyway."""

    def close_if_made(t: asyncio.Task[tuple[asyncio.BaseTransport, _Connection]]) -> None:
        if not t.cancelled() and t.exception() is None:
            t.result()[0].close()

    task.cancel()
    task.add_done_callback(close_if_made)  # runs at once (soon) if the task is already done


class Upstream:
    def __init__(
        self, connect_s: float, request_s: float, keepalive_s: float = 4.0, api_key: str | None = None
    ) -> None:
        self.connect_s, self.request_s, self.keepalive_s = connect_s, request_s, keepalive_s
        #: The header lines after the request line and Host: the engines' --api-key, if any.
        self._fixed = b"User-Agent: " + _USER_AGENT + b"\r\n"
        if api_key is not None:
            self._fixed += b"Authorization: Bearer " + api_key.encode("ascii") + b"\r\n"
        self._pool: _Pool | None = None
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        self._pool = _Pool(self.keepalive_s)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close_all()

    async def _connect(self, origin: tuple[str, str, int], url: str) -> _Connection:
        assert self._pool is not None
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        loop = asyncio.get_running_loop()
        pool = self._pool
        # Not asyncio.wait_for: before Python 3.12 it drops a cancellation that lands as the
        # connection completes, and the abandoned request would then be sent anyway.
        task = loop.create_task(loop.create_connection(lambda: _Connection(pool, origin), host, port, ssl=tls))
        try:
            done, _ = await asyncio.wait((task,), timeout=self.connect_s)
        except BaseException:
            _abandon(task)
            raise
        if not done:
            _abandon(task)
            raise Unreachable(f"{url}: cannot connect within {self.connect_s:g} s")
        exc = task.exception()
        if isinstance(exc, OSError):  # refused, unroutable, DNS (socket.gaierror), TLS handshake
            raise Unreachable(f"{url}: cannot connect: {exc}") from exc
        if exc is not None:
            raise UpstreamError(f"{url}: cannot connect: {type(exc).__name__}: {exc}") from exc
        conn = task.result()[1]
        return conn

    async def _send(self, method: bytes, url: str, body: dict[str, Any] | None, timeout_s: float) -> Stream:
        """Send one request and return once its status line and headers arrived."""
        assert self._pool is not None, "Upstream.start() was not called"
        origin, line_and_host, url = _target(url)
        if body is None:
            request = method + b" " + line_and_host + self._fixed + b"\r\n"
        else:
            payload = json.dumps(body).encode()
            request = (
                method
                + b" "
                + line_and_host
                + self._fixed
                + b"Content-Type: application/json\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload
            )
        loop = asyncio.get_running_loop()
        waited = 0.0
        for attempt in (0, 1):
            conn = self._pool.take(origin, loop.time()) if attempt == 0 else None
            reused = conn is not None
            t0 = time.monotonic()
            if conn is None:
                conn = await self._connect(origin, url)
                waited += time.monotonic() - t0
            try:
                stream = conn.begin(request, url, timeout_s)
            except _Dropped as exc:
                if reused:
                    continue  # nothing was sent: once more on a fresh connection
                raise UpstreamError(str(exc)) from None
            stream.connect_wait_s = waited
            sent_at = time.monotonic()
            try:
                await stream._head
                return stream
            except _Dropped as exc:
                # Dropped at once, before any answer, on a connection that had sat idle in the
                # pool: the instance closed it as we reused it and did not run the request. Once
                # more. Dropped later, the instance may have been working on it: not sent twice.
                conn.stream = None
                if reused and not exc.answered and time.monotonic() - sent_at < KEEPALIVE_RACE_S:
                    waited += time.monotonic() - t0
                    continue
                raise UpstreamError(str(exc)) from None
            except BaseException:
                stream._cancel_timer()
                conn.stream = None
                conn.close()  # cancelled or failed while waiting: the request is abandoned
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def open(self, url: str, body: dict[str, Any]) -> Stream:
        """POST ``body`` as JSON; returns once the status line arrived (the body streams later)."""
        return await self._send(b"POST", url, body, self.request_s)

    async def post_json(self, url: str, body: dict[str, Any], timeout_s: float) -> tuple[int, Any, str]:
        """(status, parsed JSON or None, text) of a request read to the end."""
        s = await self._send(b"POST", url, body, timeout_s)
        try:
            text = (await s.aread()).decode("utf-8", "replace")
        finally:
            await s.aclose()
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = None
        return s.status_code, parsed, text

    async def call(
        self, method: bytes, url: str, body: dict[str, Any] | None, timeout_s: float
    ) -> tuple[int, Headers, bytes]:
        """(status, headers, body) of a request read to the end, bytes as they came."""
        s = await self._send(method, url, body, timeout_s)
        try:
            return s.status_code, s.headers, await s.aread()
        finally:
            await s.aclose()

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        """(status, body) of a GET read to the end; undecodable bytes become U+FFFD."""
        s = await self._send(b"GET", url, None, timeout_s)
        try:
            return s.status_code, (await s.aread()).decode("utf-8", "replace")
        finally:
            await s.aclose()

    async def get_status(self, url: str, timeout_s: float) -> int:
        return (await self.get_text(url, timeout_s))[0]
