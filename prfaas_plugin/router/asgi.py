"""The router's hot path as plain ASGI: the two completion endpoints, without FastAPI.

Why: every request and every streamed token goes through here, and behind FastAPI/Starlette each
pays for routing, dependency solving, two middleware wrappers per ``send`` and an anyio task
group per streaming response -- about a third more CPU per relayed stream. The admin, health
and metrics endpoints stay on FastAPI, where convenience matters more.

Handlers return a :class:`Reply`; :func:`send_reply` writes it. One :func:`client_gone` watcher
per request (started once its body is read) covers both the work and a streamed answer: a
disconnect cancels the stream, whose ``finally`` closes the upstream request (which is how vLLM
learns to abort it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before its request body arrived whole."""


class BodyTooLarge(Exception):
    """The request body is over the limit (by its Content-Length, or while it was read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes")
        self.limit = limit


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: A streamed body; ``body`` is ignored when set.
    stream: AsyncIterator[bytes] | None = None


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(
        status,
        {"content-type": "application/json"},
        json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(),
    )


def header(scope: Scope, name: bytes) -> str | None:
    """A request header (``name`` lower-case), decoded as latin-1 like every ASGI server does."""
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, or :class:`BodyTooLarge` as soon as it is known to exceed ``limit``
    bytes: from its Content-Length before reading any of it, else as the chunks add up (a
    chunked body), so an oversized body is never held whole nor parsed."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
        if not msg.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def client_gone(receive: Receive) -> None:
    """Returns once the client has disconnected (call after the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _raw_headers(reply: Reply, length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    return out


async def send_reply(reply: Reply, send: Send, gone: asyncio.Future[None] | None = None) -> None:
    """Write ``reply``. ``gone``: the request's running :func:`client_gone` watcher (the
    caller's to cancel), needed for a streamed reply: a disconnect stops the relay."""
    if reply.stream is None:
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": _raw_headers(reply, len(reply.body))}
        )
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})
        return
    if gone is None:
        raise ValueError("a streamed reply needs the request's client_gone watcher")
    stream = reply.stream
    await send({"type": "http.response.start", "status": reply.status, "headers": _raw_headers(reply, None)})

    async def pump() -> None:
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # The pump is scheduled before asyncio.wait registers on the watcher, so even a watcher that
    # is already done lets the pump enter the stream (whose ``finally`` releases the upstream
    # request) before it is cancelled.
    pumping = asyncio.ensure_future(pump())
    try:
        await asyncio.wait((pumping, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not pumping.done():
            pumping.cancel()  # the client left (or we were cancelled): stop relaying
        with contextlib.suppress(asyncio.CancelledError):
            await pumping  # let the stream's finally (accounting, upstream close) run
