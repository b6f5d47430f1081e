"""Minimal proxy driving PrfaaS request protocol v1 (docs/protocol.md) for one producer and one
consumer, so the prfaas connector is usable before the router exists.

    python examples/vllm/proxy.py --producer http://127.0.0.1:8100 --consumer http://127.0.0.1:8200 \
        --decode-endpoint 127.0.0.1:15600 --port 8000

Then: curl localhost:8000/v1/completions -d '{"prompt": "...", "max_tokens": 32}'
(completions only; non-streaming).
"""

from __future__ import annotations

import click
import httpx
import uvicorn
from fastapi import FastAPI, Request

from prfaas_plugin.engines.vllm.pd_client import complete_pd


def make_app(producer: str, consumer: str, decode_endpoint: str, deadline_s: float) -> FastAPI:
    app = FastAPI(title="prfaas minimal P/D proxy")
    client = httpx.AsyncClient(timeout=600)

    @app.post("/v1/completions")
    async def completions(req: Request) -> dict:
        body = await req.json()
        res = await complete_pd(client, producer, consumer, decode_endpoint, body, deadline_s)
        return {**res.consumer, "prfaas": res.transfer}

    return app


@click.command()
@click.option("--producer", required=True, help="producer base URL (kv_producer instance)")
@click.option("--consumer", required=True, help="consumer base URL (kv_consumer instance)")
@click.option("--decode-endpoint", required=True, help="the consumer's transfer receiver host:port")
@click.option("--deadline-s", default=60.0, show_default=True)
@click.option("--port", default=8000, show_default=True)
def main(producer: str, consumer: str, decode_endpoint: str, deadline_s: float, port: int) -> None:
    uvicorn.run(make_app(producer, consumer, decode_endpoint, deadline_s), host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
