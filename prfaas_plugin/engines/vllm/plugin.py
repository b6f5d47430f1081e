"""``vllm.general_plugins`` entry point: registers the connector under ``prfaas`` and
``PrfaaSConnector``. vLLM calls it in every process, possibly several times, so it is idempotent."""

from __future__ import annotations

NAMES = ("prfaas", "PrfaaSConnector")


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name in NAMES:
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, "prfaas_plugin.engines.vllm.connector", "PrfaaSConnector")
