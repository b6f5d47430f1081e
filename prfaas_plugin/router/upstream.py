"""HTTP to the engines, on aiohttp.

httpx's connection pool scans every pooled connection per request, which cost ~4 ms a request
at 200 concurrent streams here (measured with cProfile); aiohttp's connector does not. The
wrapper keeps the shape the router needs: a streamed answer that can be read whole, iterated,
or *closed early* -- closing drops the connection, which is how vLLM learns to abort a request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import aiohttp


class UpstreamError(Exception):
    """The instance did not answer properly (reset, timeout, bad framing)."""


class Unreachable(UpstreamError):
    """No connection could be made: the instance is down or unroutable."""


class Stream:
    """An upstream answer whose status line arrived; the body is still on the wire."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status_code = resp.status
        self.headers = resp.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def aread(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Release the connection for reuse if the body was read to the end, else drop it
        (the engine sees the disconnect and aborts the request)."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class Upstream:
    def __init__(self, connect_s: float, request_s: float, keepalive_s: float = 4.0) -> None:
        self.connect_s, self.request_s, self.keepalive_s = connect_s, request_s, keepalive_s
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True,
                                           keepalive_timeout=self.keepalive_s),
            timeout=aiohttp.ClientTimeout(total=self.request_s, sock_connect=self.connect_s),
            auto_decompress=False, json_serialize=json.dumps)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def open(self, url: str, body: dict[str, Any]) -> Stream:
        assert self.session is not None
        try:
            resp = await self._post_once_more_if_stale(url, body)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # No connection was made, so nothing was sent: placing the request elsewhere is safe.
            raise Unreachable(f"{url}: {exc}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"{url}: {type(exc).__name__}: {exc}") from exc
        return Stream(resp)

    async def _post_once_more_if_stale(self, url: str, body: dict[str, Any],
                                       timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        """POST; if the connection dropped before any answer, once more on a fresh connection.

        A pooled connection the instance closed as idle at the moment it was reused fails with
        "Server disconnected" before the request was read, so resending cannot run it twice. An
        instance that died instead refuses the fresh connection (Unreachable: the router
        re-places the request) or drops it again (an UpstreamError for the caller)."""
        assert self.session is not None
        kw = {} if timeout is None else {"timeout": timeout}
        try:
            return await self.session.post(url, json=body, **kw)
        except aiohttp.ServerDisconnectedError:
            return await self.session.post(url, json=body, **kw)

    async def post_json(self, url: str, body: dict[str, Any], timeout_s: float) -> tuple[int, Any, str]:
        """(status, parsed JSON or None, text) of a request read to the end."""
        assert self.session is not None
        try:
            r = await self._post_once_more_if_stale(
                url, body, aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.connect_s))
            async with r:
                text = await r.text()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise Unreachable(f"{url}: {exc}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = None
        return r.status, parsed, text

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        """(status, body) of a GET read to the end; undecodable bytes become U+FFFD."""
        assert self.session is not None
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status, (await r.read()).decode("utf-8", "replace")
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"{url}: {exc}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"{url}: {type(exc).__name__}: {exc}") from exc

    async def get_status(self, url: str, timeout_s: float) -> int:
        return (await self.get_text(url, timeout_s))[0]
