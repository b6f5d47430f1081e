"""The contracts between the project's processes, each defined once.

- ``requests``: the per-request protocol the router (or any client) speaks with the engines --
  ``kv_transfer_params`` for the vLLM connector, SGLang's bootstrap fields -- and the version
  the connector checks (docs/protocol.md is generated from this module).
- ``transfer``: the transfer engine's gRPC service name and wire-protocol version.
- ``metrics``: every Prometheus metric name the project exports or reads, with its help text.

Everything here is plain data and pure functions with no engine imports, so the router, both
engine adapters, the simulator and the benches can all import it.
"""

from prfaas_plugin.protocol.requests import (
    REQUEST_PROTOCOL_VERSION,
    BadParams,
    ProducerOutcome,
    RequestParams,
    bootstrap_host,
    parse_params,
    producer_outcome,
    sglang_bodies,
    transfer_params,
    vllm_bodies,
)
from prfaas_plugin.protocol.transfer import GRPC_SERVICE, TRANSFER_PROTOCOL_VERSION

__all__ = [
    "GRPC_SERVICE",
    "REQUEST_PROTOCOL_VERSION",
    "TRANSFER_PROTOCOL_VERSION",
    "BadParams",
    "ProducerOutcome",
    "RequestParams",
    "bootstrap_host",
    "parse_params",
    "producer_outcome",
    "sglang_bodies",
    "transfer_params",
    "vllm_bodies",
]
