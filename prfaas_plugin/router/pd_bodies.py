"""The two requests of a disaggregated completion, per engine: what the prefill instance and
the decode instance are sent. The router's flow (both at once, stream the decode's answer, fall
back when the prefill fails) is the same for both engines; only the bodies differ.

- vLLM + prfaas connector: ``kv_transfer_params`` (docs/protocol.md). The producer prefills
  only (``max_tokens: 1``) and pushes the KV to the consumer's transfer endpoint.
- SGLang (PD mode, ``--disaggregation-transfer-backend prfaas``): the same body to both sides
  with ``bootstrap_host``/``bootstrap_port``/``bootstrap_room`` added, as SGLang's own routers
  (mini_lb, the model gateway) do; the decode finds the prefill through its bootstrap server.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any
from urllib.parse import urlsplit

from prfaas_plugin.engines.vllm.params import PROTOCOL_VERSION  # the version the connector checks


def vllm_bodies(body: dict[str, Any], decode_kv_endpoint: str, deadline_s: float) -> tuple[dict, dict, str]:
    """(producer body, consumer body, transfer id)."""
    transfer_id, token = uuid.uuid4().hex, secrets.token_urlsafe(24)
    common = {"prfaas_version": PROTOCOL_VERSION, "transfer_id": transfer_id, "token": token, "deadline_s": deadline_s}
    prod = {k: v for k, v in body.items() if k != "stream_options"}
    prod.update(
        max_tokens=1,
        stream=False,
        kv_transfer_params={**common, "role": "producer", "decode_endpoint": decode_kv_endpoint},
    )
    if "max_completion_tokens" in prod:
        prod["max_completion_tokens"] = 1
    cons = {**body, "kv_transfer_params": {**common, "role": "consumer"}}
    return prod, cons, transfer_id


def bootstrap_host(prefill_url: str) -> str:
    """The host part of the prefill's URL as SGLang's decode dials it (IPv6 in brackets)."""
    host = urlsplit(prefill_url).hostname
    if not host:
        raise ValueError(f"no host in prefill url {prefill_url!r}")
    return f"[{host}]" if ":" in host else host


def sglang_bodies(body: dict[str, Any], prefill_url: str, bootstrap_port: int) -> tuple[dict, dict, str]:
    """(prefill body, decode body, room as a string). The prefill's answer is read whole, so it is
    asked for without streaming; the decode gets the client's body unchanged otherwise."""
    room = secrets.randbits(63)
    inject = {"bootstrap_host": bootstrap_host(prefill_url), "bootstrap_port": bootstrap_port, "bootstrap_room": room}
    prod = {k: v for k, v in body.items() if k != "stream_options"}
    prod.update(inject, stream=False)
    return prod, {**body, **inject}, str(room)
