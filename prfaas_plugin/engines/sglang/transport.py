"""Where the SGLang backend gets its transfer engine from.

The backend codes against ``prfaas_plugin.transfer.api`` only. A :class:`Transport` builds the
two endpoints a rank needs: prefill ranks a sender, decode ranks a receiver.
``PrfaasKVManager.transport_factory`` picks the implementation, so a test can put an in-process
fabric there while production uses the engine of ``prfaas_plugin.transfer``.
"""

from __future__ import annotations

from typing import Callable, Protocol

from prfaas_plugin.engines.sglang.config import BackendConfig
from prfaas_plugin.transfer.api import TransferReceiver, TransferSender


class Transport(Protocol):
    def sender(self) -> TransferSender: ...

    def receiver(self, host: str, port: int) -> TransferReceiver: ...


TransportFactory = Callable[[BackendConfig], Transport]


class TransferEngineMissing(RuntimeError):
    """This build has no transfer engine implementation behind ``prfaas_plugin.transfer.api``."""


def engine_transport(config: BackendConfig) -> Transport:
    """The production transport: the multi-connection TCP/gRPC engine of ``prfaas_plugin.transfer``."""
    try:
        from prfaas_plugin.transfer import engine  # type: ignore[attr-defined]
    except ImportError as exc:
        raise TransferEngineMissing(
            "prfaas SGLang backend: the transfer engine (prfaas_plugin.transfer.engine) is not "
            f"available in this build ({exc})"
        ) from exc
    return engine.make_transport(config)  # type: ignore[no-any-return]
