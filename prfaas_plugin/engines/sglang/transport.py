"""Where the SGLang backend gets its transfer engine from.

The backend codes against ``prfaas_plugin.transfer.api`` only. ``PrfaasKVManager.transport_factory``
picks the implementation (tests inject an in-process fabric); production uses
:func:`engine_transport`, the shared binding of ``prfaas_plugin.transfer.binding`` configured
from the backend's ``PRFAAS_SGLANG_*`` settings.
"""

from __future__ import annotations

from prfaas_plugin.engines.sglang.config import BackendConfig
from prfaas_plugin.transfer.binding import EndpointSpec, EngineTransport, Transport, TransportFactory

__all__ = ["Transport", "TransportFactory", "engine_transport", "endpoint_spec"]


def endpoint_spec(config: BackendConfig) -> EndpointSpec:
    return EndpointSpec(
        sender_id="sglang-prefill",
        receiver_id="sglang-decode",
        tls=config.tls_options(),
        connections=config.connections,
        pacing_gbps=config.pacing_gbps,
        checksums=config.checksums,
        allow_unverified_plaintext=config.allow_unverified_plaintext,
    )


def engine_transport(config: BackendConfig) -> Transport:
    return EngineTransport(endpoint_spec(config))
