"""PrfaaS KV transfer engine: gRPC control sessions, multi-connection TCP data plane.

``GrpcTcpReceiver`` / ``GrpcTcpSender`` implement the contract in ``api.py``."""

from prfaas_plugin.transfer.api import (  # noqa: F401
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
from prfaas_plugin.transfer.config import ReceiverConfig, SenderConfig, TlsConfig  # noqa: F401
from prfaas_plugin.transfer.receiver import GrpcTcpReceiver  # noqa: F401
from prfaas_plugin.transfer.sender import GrpcTcpSender  # noqa: F401
