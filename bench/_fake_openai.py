"""An instant OpenAI-compatible backend for router benchmarks (answers as fast as it can; plays
the producer role when the request carries producer kv_transfer_params).

    python bench/_fake_openai.py PORT

Plain ASGI, not FastAPI: it shares a core with the load generator in bench/router.py, and
behind FastAPI's StreamingResponse each 20-token stream cost it ~3 ms of CPU, which made the
*direct* baseline's p99 swing 20-80 ms between runs (CPU queueing on the shared core) and so
drowned the router's own added latency in noise. ``bench_token_delay_s`` in a request plays a
decoding engine: one token per delay, ``max_tokens`` of them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import uvicorn

_CHUNK = (
    "data: " + json.dumps({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "tok"}]}) + "\n\n"
).encode()
_DONE = b"data: [DONE]\n\n"


async def _json(send: Any, obj: Any, status: int = 200) -> None:
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["method"] == "GET" and scope["path"] == "/health":
        return await _json(send, {"ok": True})
    if scope["method"] != "POST" or scope["path"] != "/v1/completions":
        return await _json(send, {"error": "not found"}, 404)
    parts = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    body = json.loads(b"".join(parts))
    kvp = body.get("kv_transfer_params") or {}
    if kvp.get("role") == "producer":
        return await _json(
            send,
            {
                "id": "p",
                "choices": [{"index": 0, "text": "x"}],
                "kv_transfer_params": {"status": "sent", "bytes": 1 << 20},
            },
        )
    if not body.get("stream"):
        return await _json(
            send, {"id": "d", "object": "text_completion", "choices": [{"index": 0, "text": "tok tok tok tok"}]}
        )
    delay = float(body.get("bench_token_delay_s") or 0.0)
    n = int(body.get("max_tokens") or 4) if delay else 4
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(n):
        if delay and i:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": _DONE})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", backlog=4096)
