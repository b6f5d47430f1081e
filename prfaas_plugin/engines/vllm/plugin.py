"""``vllm.general_plugins`` entry point: registers the connector under ``prfaas`` and
``PrfaaSConnector``. vLLM calls it in every process, possibly several times, so it is idempotent.

Under a vLLM outside ``compat.SUPPORTED_RANGE`` it logs one error line and registers nothing:
vLLM loads every installed general plugin, so raising here would stop engines that do not use
PrfaaS at all; an engine that does ask for ``prfaas`` then fails with vLLM's own "unknown
connector" error, right after this line names the cause."""

from __future__ import annotations

import logging

from prfaas_plugin.engines.vllm import compat

NAMES = ("prfaas", "PrfaaSConnector")

log = logging.getLogger("vllm.prfaas")  # child of vLLM's logger: same handlers and format


def register() -> None:
    reason = compat.unsupported_reason(compat.vllm_version())
    if reason is not None:
        log.error("%s", reason)
        return
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name in NAMES:
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, "prfaas_plugin.engines.vllm.connector", "PrfaaSConnector")
