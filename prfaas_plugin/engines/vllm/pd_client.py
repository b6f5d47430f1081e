"""Drives request protocol v1 against a producer and a consumer (docs/protocol.md), so the
connector is usable before the router exists: both requests go out at once, the consumer's answer
is returned, the producer's outcome (``kv_transfer_params``) is returned alongside."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from prfaas_plugin.protocol.requests import transfer_params


@dataclass
class PDResult:
    consumer: dict[str, Any]
    producer: dict[str, Any]

    @property
    def text(self) -> str:
        return self.consumer["choices"][0]["text"]

    @property
    def transfer(self) -> dict[str, Any]:
        return self.producer.get("kv_transfer_params") or {}


async def complete_pd(
    client: httpx.AsyncClient,
    producer_url: str,
    consumer_url: str,
    decode_endpoint: str,
    body: dict[str, Any],
    deadline_s: float = 60.0,
) -> PDResult:
    """One completion prefilled on the producer and decoded on the consumer."""
    p_params, c_params = transfer_params(decode_endpoint, deadline_s)
    p_body = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": p_params}
    c_body = {**body, "kv_transfer_params": c_params}
    rp, rc = await asyncio.gather(
        client.post(f"{producer_url}/v1/completions", json=p_body),
        client.post(f"{consumer_url}/v1/completions", json=c_body),
    )
    rc.raise_for_status()
    # a failed producer is not fatal: the consumer recomputed; its outcome is still reported
    return PDResult(rc.json(), rp.json() if rp.status_code == 200 else {"error": rp.text})
