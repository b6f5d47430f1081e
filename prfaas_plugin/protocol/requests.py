"""Request protocol v1: what a router sends the engines for one disaggregated completion, and
what the engines check and answer (docs/protocol.md is generated from this module).

vLLM + the prfaas connector: the producer and the consumer each get ``kv_transfer_params``;
the producer prefills only (``max_tokens: 1``) and pushes the KV to the consumer's transfer
endpoint; its answer's top-level ``kv_transfer_params`` carries the outcome.

SGLang (PD mode, ``--disaggregation-transfer-backend prfaas``): the same body to both sides with
``bootstrap_host``/``bootstrap_port``/``bootstrap_room`` added, as SGLang's own routers do.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from prfaas_plugin.protocol.transfer import MIN_TOKEN_CHARS

#: The version the vLLM connector accepts in ``kv_transfer_params.prfaas_version``.
REQUEST_PROTOCOL_VERSION = 1
#: The key whose presence marks ``kv_transfer_params`` as ours (other connectors' params lack it).
VERSION_KEY = "prfaas_version"
#: Bounds of ``deadline_s``: a transfer longer than an hour is a configuration mistake.
MAX_DEADLINE_S = 3600.0
DEFAULT_DEADLINE_S = 60.0

Role = Literal["producer", "consumer"]
ROLES: tuple[Role, ...] = ("producer", "consumer")
#: ``kv_transfer_params.status`` in a producer's answer.
STATUS_SENT, STATUS_FAILED = "sent", "failed"

#: Fields of ``kv_transfer_params`` per role: (name, type, meaning). The docs table is made from it.
PARAM_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    (VERSION_KEY, "int", "both", f"protocol version, {REQUEST_PROTOCOL_VERSION}"),
    ("role", "str", "both", "`producer` or `consumer`"),
    ("transfer_id", "str", "both", "unique id of the transfer (32 hex chars), the same on both sides"),
    ("token", "str", "both", "a fresh secret (>= 128 bits, URL-safe); the receiver accepts the session only with it"),
    ("deadline_s", "number", "both", f"seconds the transfer may take, in (0, {MAX_DEADLINE_S:.0f}]"),
    ("decode_endpoint", "str", "producer", "the consumer's transfer endpoint, `host:port`"),
)
#: Fields of the producer answer's top-level ``kv_transfer_params``.
OUTCOME_FIELDS: tuple[tuple[str, str, str], ...] = (
    (VERSION_KEY, "int", "protocol version"),
    ("transfer_id", "str", "the transfer this answers"),
    ("status", "str", f"`{STATUS_SENT}` or `{STATUS_FAILED}`"),
    ("error", "str", f"why, when `{STATUS_FAILED}`"),
    ("num_tokens", "int", "tokens whose KV was sent"),
    ("bytes", "int", "KV bytes the layout predicts for them"),
)
#: Fields added to both bodies for SGLang's bootstrap protocol.
SGLANG_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("bootstrap_host", "str", "the prefill server's host as the decode dials it (IPv6 in brackets)"),
    ("bootstrap_port", "int", "the prefill server's bootstrap port"),
    ("bootstrap_room", "int", "a random 63-bit id pairing the two requests"),
)


class BadParams(ValueError):
    """``kv_transfer_params`` that claim to be PrfaaS but are malformed."""


@dataclass(frozen=True)
class RequestParams:
    """Validated ``kv_transfer_params`` of one request, as the connector uses them."""

    role: Role
    transfer_id: str
    token: str
    deadline_s: float
    decode_endpoint: str = ""


def parse_params(raw: Mapping[str, Any] | None) -> RequestParams | None:
    """``None`` for requests that are not PrfaaS transfers; raise BadParams naming the bad field."""
    if not raw or VERSION_KEY not in raw:
        return None
    if raw.get(VERSION_KEY) != REQUEST_PROTOCOL_VERSION:
        raise BadParams(f"{VERSION_KEY} {raw.get(VERSION_KEY)!r} unsupported (expected {REQUEST_PROTOCOL_VERSION})")
    role = raw.get("role")
    if role not in ROLES:
        raise BadParams(f"role must be 'producer' or 'consumer', got {role!r}")
    for key in ("transfer_id", "token"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise BadParams(f"{key} must be a non-empty string")
    if len(raw["token"]) < MIN_TOKEN_CHARS:
        raise BadParams(f"token must be at least {MIN_TOKEN_CHARS} characters (a secret of 128 bits or more)")
    deadline = raw.get("deadline_s", DEFAULT_DEADLINE_S)
    if (
        not isinstance(deadline, (int, float))
        or isinstance(deadline, bool)
        or not math.isfinite(deadline)
        or not 0 < deadline <= MAX_DEADLINE_S
    ):
        raise BadParams(f"deadline_s must be a number in (0, {MAX_DEADLINE_S:.0f}], got {deadline!r}")
    endpoint = raw.get("decode_endpoint", "")
    if role == "producer":
        host, _, port = str(endpoint).rpartition(":")
        if not host or not port.isdigit():
            raise BadParams(f"decode_endpoint must be 'host:port', got {endpoint!r}")
    return RequestParams(role, raw["transfer_id"], raw["token"], float(deadline), str(endpoint))


def transfer_params(
    decode_endpoint: str, deadline_s: float = DEFAULT_DEADLINE_S, transfer_id: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(producer params, consumer params) for one transfer, with a fresh id and token."""
    common = {
        VERSION_KEY: REQUEST_PROTOCOL_VERSION,
        "transfer_id": transfer_id or uuid.uuid4().hex,
        "token": secrets.token_urlsafe(24),
        "deadline_s": deadline_s,
    }
    return {**common, "role": "producer", "decode_endpoint": decode_endpoint}, {**common, "role": "consumer"}


def vllm_bodies(
    body: Mapping[str, Any], decode_kv_endpoint: str, deadline_s: float
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(producer body, consumer body, transfer id) for a client's completion body. The producer
    prefills only and answers whole; the consumer gets the client's body unchanged otherwise."""
    p_params, c_params = transfer_params(decode_kv_endpoint, deadline_s)
    prod = {k: v for k, v in body.items() if k != "stream_options"}
    prod.update(max_tokens=1, stream=False, kv_transfer_params=p_params)
    if "max_completion_tokens" in prod:
        prod["max_completion_tokens"] = 1
    cons = {**body, "kv_transfer_params": c_params}
    return prod, cons, str(p_params["transfer_id"])


def outcome_params(transfer_id: str, ok: bool, num_tokens: int = 0, nbytes: int = 0, error: str = "") -> dict[str, Any]:
    """The producer answer's ``kv_transfer_params`` (what the connector returns to vLLM)."""
    out: dict[str, Any] = {
        VERSION_KEY: REQUEST_PROTOCOL_VERSION,
        "transfer_id": transfer_id,
        "status": STATUS_SENT if ok else STATUS_FAILED,
        "num_tokens": num_tokens,
        "bytes": nbytes,
    }
    if not ok:
        out["error"] = error or "transfer failed"
    return out


@dataclass(frozen=True)
class ProducerOutcome:
    """A producer answer's transfer outcome as the router reads it."""

    ok: bool
    kv_bytes: int = 0
    error: str = ""


def producer_outcome(answer: Any) -> ProducerOutcome:
    """Read a producer's parsed JSON answer. No ``kv_transfer_params`` counts as sent (an engine
    that reports nothing, e.g. SGLang, failed by HTTP status, not here)."""
    if not isinstance(answer, dict):
        return ProducerOutcome(False, error="producer answered non-JSON")
    params = answer.get("kv_transfer_params") or {}
    if not isinstance(params, dict):
        return ProducerOutcome(False, error="producer answered malformed kv_transfer_params")
    if params.get("status") == STATUS_FAILED:
        return ProducerOutcome(False, error=str(params.get("error", "transfer failed")))
    nbytes = params.get("bytes") or 0
    # A count the router adds to counters: a negative, infinite or NaN one reads as unknown (0).
    ok_count = isinstance(nbytes, (int, float)) and not isinstance(nbytes, bool) and math.isfinite(nbytes)
    return ProducerOutcome(True, kv_bytes=max(0, int(nbytes)) if ok_count else 0)


def bootstrap_host(prefill_url: str) -> str:
    """The host part of the prefill's URL as SGLang's decode dials it (IPv6 in brackets)."""
    host = urlsplit(prefill_url).hostname
    if not host:
        raise ValueError(f"no host in prefill url {prefill_url!r}")
    return f"[{host}]" if ":" in host else host


def sglang_bodies(
    body: Mapping[str, Any], prefill_url: str, bootstrap_port: int
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(prefill body, decode body, room as a string). The prefill's answer is read whole, so it
    is asked for without streaming; the decode gets the client's body unchanged otherwise."""
    room = secrets.randbits(63)
    inject = {"bootstrap_host": bootstrap_host(prefill_url), "bootstrap_port": bootstrap_port, "bootstrap_room": room}
    prod = {k: v for k, v in body.items() if k != "stream_options"}
    prod.update(inject, stream=False)
    return prod, {**body, **inject}, str(room)
