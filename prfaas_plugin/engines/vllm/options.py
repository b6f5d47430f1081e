"""``kv_connector_extra_config`` of the prfaas connector, validated once at startup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from prfaas_plugin.transfer.binding import EndpointSpec, TlsSettings


class Options(TlsSettings):
    """Defaults are what docs/vllm.md documents. TLS for both roles and both planes: the keys of
    :class:`TlsSettings`, shared with the SGLang backend (``PRFAAS_SGLANG_TLS_*``): ``tls_cert``,
    ``tls_key``, ``tls_ca``, ``tls_require_client_cert`` (consumer: mutual TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: consumer: where the transfer receiver listens (``host:port``; port + tp_rank per worker)
    listen: str = "0.0.0.0:15600"
    #: what a failed/timed-out load does; overrides vLLM's kv_load_failure_policy (default fail)
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    #: a model identity both sides must agree on (default: the model path's last component)
    model_id: str = ""
    #: consumer: fixed data-plane port (+ tp_rank per worker) for firewall rules; 0 = any free port
    data_port: int = Field(default=0, ge=0, lt=65536)
    #: consumer: the data-plane ``host:port`` producers should dial when it differs from the bound
    #: one (NAT, a load balancer or a proxy in between); tp_rank is added to the port
    advertise_data: str | None = None
    #: producer: data connections per receiver (striping width; 4 fill a 2 Gbit/s, 20 ms link)
    connections: int = Field(default=4, ge=1, le=64)
    #: producer: egress budget in Gbit/s for this instance's transfers (None = unpaced)
    pacing_gbps: float | None = Field(default=None, gt=0)
    #: the TP size of the instances on the other side of the transfer (a producer's decode
    #: instances, a consumer's prefill instances) when it differs from this instance's: each rank
    #: then exchanges exactly its share of every layer with the peer ranks it pairs with. One of
    #: the two sizes must divide the other. None: the same TP size (rank pairs with rank).
    peer_tp_size: int | None = Field(default=None, ge=1)

    @field_validator("listen", "advertise_data")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"must be 'host:port', got {v!r}")
        return v

    def endpoint_spec(self, engine_id: str) -> EndpointSpec:
        """What this instance's transfer endpoints are built from (ports per rank aside)."""
        return EndpointSpec(
            sender_id=f"vllm-{engine_id}",
            receiver_id=f"vllm-{engine_id}",
            tls=self.tls_options(),
            connections=self.connections,
            pacing_gbps=self.pacing_gbps,
        )

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> Options:
        return cls(**dict(extra or {}))
