"""The transfer engine's control plane identity (protos/prfaas/v1/transfer.proto).

The receiver refuses an ``Open`` whose ``protocol_version`` differs, so a sender and a receiver
from releases that changed the framing fail at the handshake with a clear error rather than
mid-transfer."""

from __future__ import annotations

#: The fully qualified gRPC service both sides register and call.
GRPC_SERVICE = "prfaas.v1.Transfer"
#: Version of the framing and handshake carried in ``OpenRequest.protocol_version``.
TRANSFER_PROTOCOL_VERSION = 1
#: Shortest session token a receiver accepts: tokens are secrets of 128 bits or more, and the
#: request protocol refuses a shorter one in ``kv_transfer_params`` before it reaches a receiver.
MIN_TOKEN_CHARS = 16
