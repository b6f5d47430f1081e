"""Validation of the per-request ``kv_transfer_params`` of protocol v1 (docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1


class BadParams(ValueError):
    """``kv_transfer_params`` that claim to be PrfaaS but are malformed."""


@dataclass(frozen=True)
class RequestParams:
    role: str  # "producer" | "consumer"
    transfer_id: str
    token: str
    deadline_s: float
    decode_endpoint: str = ""


def parse(raw: Mapping[str, Any] | None) -> RequestParams | None:
    """``None`` for requests that are not PrfaaS transfers; raise BadParams naming the bad field."""
    if not raw or "prfaas_version" not in raw:
        return None
    if raw.get("prfaas_version") != PROTOCOL_VERSION:
        raise BadParams(f"prfaas_version {raw.get('prfaas_version')!r} unsupported (expected {PROTOCOL_VERSION})")
    role = raw.get("role")
    if role not in ("producer", "consumer"):
        raise BadParams(f"role must be 'producer' or 'consumer', got {role!r}")
    for key in ("transfer_id", "token"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise BadParams(f"{key} must be a non-empty string")
    deadline = raw.get("deadline_s", 60)
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not 0 < deadline <= 3600:
        raise BadParams(f"deadline_s must be a number in (0, 3600], got {deadline!r}")
    endpoint = raw.get("decode_endpoint", "")
    if role == "producer":
        host, _, port = str(endpoint).rpartition(":")
        if not host or not port.isdigit():
            raise BadParams(f"decode_endpoint must be 'host:port', got {endpoint!r}")
    return RequestParams(role, raw["transfer_id"], raw["token"], float(deadline), str(endpoint))
