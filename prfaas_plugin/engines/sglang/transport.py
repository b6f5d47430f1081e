"""Where the SGLang backend gets its transfer engine from.

The backend codes against ``prfaas_plugin.transfer.api`` only. A :class:`Transport` builds the
two endpoints a rank needs: prefill ranks a sender, decode ranks a receiver.
``PrfaasKVManager.transport_factory`` picks the implementation; production uses
:func:`engine_transport` (gRPC control session + multi-connection TCP data plane).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prfaas_plugin.engines.sglang.config import BackendConfig
from prfaas_plugin.transfer.api import TransferReceiver, TransferSender


class Transport(Protocol):
    def sender(self) -> TransferSender: ...

    def receiver(self, host: str, port: int, data_port: int = 0) -> TransferReceiver: ...


TransportFactory = Callable[[BackendConfig], Transport]


class EngineTransport:
    """The prfaas transfer engine, configured from the backend's settings."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    def _tls(self, server: bool) -> object | None:
        from prfaas_plugin.transfer import TlsConfig

        c = self.config
        if not (c.tls_cert or c.tls_ca):
            return None
        return TlsConfig(
            cert_file=c.tls_cert,
            key_file=c.tls_key,
            ca_file=c.tls_ca,
            require_client_cert=c.tls_require_client_cert if server else False,
        )

    def sender(self) -> TransferSender:
        from prfaas_plugin.transfer import GrpcTcpSender, SenderConfig

        kwargs: dict = {"pacing_gbps": self.config.pacing_gbps, "tls": self._tls(server=False)}
        if self.config.connections is not None:
            kwargs["connections"] = self.config.connections
        return GrpcTcpSender(SenderConfig(sender_id="sglang-prefill", **kwargs))

    def receiver(self, host: str, port: int, data_port: int = 0) -> TransferReceiver:
        from prfaas_plugin.transfer import GrpcTcpReceiver, ReceiverConfig

        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return GrpcTcpReceiver(
            ReceiverConfig(listen=listen, data_port=data_port, receiver_id="sglang-decode", tls=self._tls(server=True))
        )


def engine_transport(config: BackendConfig) -> Transport:
    return EngineTransport(config)
