"""``kv_connector_extra_config`` of the prfaas connector, validated once at startup."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, field_validator


class Options(BaseModel):
    """Defaults are what docs/vllm.md documents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: consumer: where the transfer receiver listens (``host:port``; port + tp_rank per worker)
    listen: str = "0.0.0.0:15600"
    #: what a failed/timed-out load does; overrides vLLM's kv_load_failure_policy (default fail)
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    #: a model identity both sides must agree on (default: the model path's last component)
    model_id: str = ""

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen must be 'host:port', got {v!r}")
        return v

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> "Options":
        return cls(**dict(extra or {}))
