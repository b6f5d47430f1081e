"""PrfaaS KV transfer engine: gRPC control sessions, multi-connection TCP data plane.

``GrpcTcpReceiver`` / ``GrpcTcpSender`` implement the contract in ``api.py``."""

from prfaas_plugin.transfer.api import (
    Aborted,
    AuthError,
    ChecksumError,
    FingerprintMismatch,
    ItemSpec,
    LayoutFingerprint,
    PeerGone,
    ProtocolError,
    ReceiveHandle,
    ReceiveSink,
    SendHandle,
    TransferError,
    TransferManifest,
    TransferReceiver,
    TransferSender,
    TransferTimeout,
)
from prfaas_plugin.transfer.config import ReceiverConfig, SenderConfig, TlsConfig
from prfaas_plugin.transfer.receiver import GrpcTcpReceiver
from prfaas_plugin.transfer.sender import GrpcTcpSender

__all__ = [
    "Aborted",
    "AuthError",
    "ChecksumError",
    "FingerprintMismatch",
    "GrpcTcpReceiver",
    "GrpcTcpSender",
    "ItemSpec",
    "LayoutFingerprint",
    "PeerGone",
    "ProtocolError",
    "ReceiveHandle",
    "ReceiveSink",
    "ReceiverConfig",
    "SendHandle",
    "SenderConfig",
    "TlsConfig",
    "TransferError",
    "TransferManifest",
    "TransferReceiver",
    "TransferSender",
    "TransferTimeout",
]
