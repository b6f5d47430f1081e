"""An instant OpenAI-compatible backend for router benchmarks (answers as fast as it can; plays
the producer role when the request carries producer kv_transfer_params).

    python bench/_fake_openai.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()
_CHUNK = json.dumps({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "tok"}]})


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/v1/completions")
async def completions(request: Request):  # type: ignore[no-untyped-def]
    body = await request.json()
    kvp = body.get("kv_transfer_params") or {}
    if kvp.get("role") == "producer":
        return {"id": "p", "choices": [{"index": 0, "text": "x"}],
                "kv_transfer_params": {"status": "sent", "bytes": 1 << 20}}
    if body.get("stream"):
        # bench_token_delay_s > 0 plays a decoding engine: one token per delay, max_tokens of them.
        delay = float(body.get("bench_token_delay_s") or 0.0)
        n = int(body.get("max_tokens") or 4) if delay else 4

        async def gen():  # type: ignore[no-untyped-def]
            for i in range(n):
                if delay and i:
                    await asyncio.sleep(delay)
                yield f"data: {_CHUNK}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")
    return {"id": "d", "object": "text_completion", "choices": [{"index": 0, "text": "tok tok tok tok"}]}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", backlog=4096)
