"""``kv_connector_extra_config`` of the prfaas connector, validated once at startup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from prfaas_plugin.protocol.requests import MAX_DEADLINE_S
from prfaas_plugin.transfer.binding import ChannelSettings, EndpointSpec
from prfaas_plugin.transfer.config import check_hostport


class OffloadOptions(BaseModel):
    """``offload``: decode-initiated offload (engines/vllm/offload.py). A consumer that has it
    decides per request, from its own prefix-cache hit, whether a PrfaaS prefill instance
    prefills the prompt and pushes the KV here. Defaults are what docs/vllm.md documents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: base URLs of the PrfaaS prefill instances (vLLM with the prfaas connector, kv_producer
    #: or kv_both), e.g. ``http://prfaas-0:8000``
    prefill_urls: list[str] = Field(min_length=1)
    #: this instance's transfer receiver as those instances dial it (``host:port``), what the
    #: router calls ``kv_endpoint``
    kv_endpoint: str
    #: t in tokens while no router answers (or none is configured): uncached prompt tokens
    #: above it are offloaded
    threshold_tokens: float = Field(default=4096, ge=0)
    #: a ``prfaas router`` base URL whose ``GET /admin/threshold`` gives the fleet's t
    threshold_url: str | None = None
    #: name of the environment variable holding the router's admin key (Bearer); unset: no key
    threshold_key_env: str | None = None
    #: seconds between threshold reads
    threshold_refresh_s: float = Field(default=2.0, gt=0)
    #: a threshold read longer ago than this is stale: ``threshold_tokens`` applies again
    threshold_stale_s: float = Field(default=30.0, gt=0)
    #: seconds the remote prefill and the transfer may take together; past it the request
    #: prefills here (it is the transfer's ``deadline_s`` and the prefill request's timeout)
    deadline_s: float = Field(default=30.0, gt=0, le=MAX_DEADLINE_S)
    #: offloads open at once per PrfaaS instance; beyond it a request stays local
    max_inflight: int = Field(default=32, ge=1)
    #: seconds an instance that failed to answer is left out before it is tried again
    retry_after_s: float = Field(default=5.0, gt=0)
    #: seconds between reads of the PrfaaS instances' queue gauges (their /metrics), the load
    #: the choice between them uses; 0 = count only this instance's own offloads
    load_scrape_s: float = Field(default=2.0, ge=0)
    #: name of the environment variable holding the PrfaaS instances' ``--api-key``, if any
    api_key_env: str | None = None
    #: the model name to send the PrfaaS instances (None: their only served model)
    model: str | None = None

    @field_validator("kv_endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        check_hostport(v, "kv_endpoint")
        return v

    @field_validator("prefill_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"prefill_urls: {u!r} is not an http(s) URL")
        return [u.rstrip("/") for u in v]

    @field_validator("threshold_url")
    @classmethod
    def _router(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"threshold_url: {v!r} is not an http(s) URL")
        return None if v is None else v.rstrip("/")


class Options(ChannelSettings):
    """Defaults are what docs/vllm.md documents. TLS for both roles and both planes and the
    per-chunk checksums: the keys of :class:`ChannelSettings`, shared with the SGLang backend
    (``PRFAAS_SGLANG_TLS_*``, ``PRFAAS_SGLANG_CHECKSUMS``): ``tls_cert``, ``tls_key``, ``tls_ca``,
    ``tls_require_client_cert`` (consumer: mutual TLS), ``checksums``, ``allow_unverified_plaintext``."""

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
    #: pinned host staging per GPU for KV on its way to or from the wire, allocated once at the
    #: first transfer (kernels/device.py); a full pool makes new transfers wait (backpressure).
    #: The default holds a few 32K-token requests of the hybrid models; unused with CPU caches.
    staging_pool_mb: int = Field(default=4096, ge=1)
    #: consumer: decide offloads here (see :class:`OffloadOptions`); None = only the router does
    offload: OffloadOptions | None = None

    @field_validator("listen", "advertise_data")
    @classmethod
    def _hostport(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            check_hostport(v, info.field_name or "")
        return v

    def endpoint_spec(self, engine_id: str) -> EndpointSpec:
        """What this instance's transfer endpoints are built from (ports per rank aside)."""
        return EndpointSpec(
            sender_id=f"vllm-{engine_id}",
            receiver_id=f"vllm-{engine_id}",
            tls=self.tls_options(),
            connections=self.connections,
            pacing_gbps=self.pacing_gbps,
            checksums=self.checksums,
            allow_unverified_plaintext=self.allow_unverified_plaintext,
        )

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> Options:
        return cls(**dict(extra or {}))
