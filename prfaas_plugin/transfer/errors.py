"""One table between gRPC status codes and the typed TransferErrors, used by both sides, so a
receiver-side failure reaches the sender as the same error class."""

from __future__ import annotations

import grpc

from prfaas_plugin.transfer.api import (
    Aborted,
    AuthError,
    ChecksumError,
    FingerprintMismatch,
    PeerGone,
    ProtocolError,
    TransferError,
    TransferTimeout,
)

_TO_CODE: list[tuple[type[TransferError], grpc.StatusCode]] = [
    (FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ChecksumError, grpc.StatusCode.DATA_LOSS),
    (TransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Aborted, grpc.StatusCode.ABORTED),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (PeerGone, grpc.StatusCode.UNAVAILABLE),
]
_FROM_CODE = {code: cls for cls, code in _TO_CODE}
_FROM_CODE[grpc.StatusCode.PERMISSION_DENIED] = AuthError
_FROM_CODE[grpc.StatusCode.NOT_FOUND] = AuthError
_FROM_CODE[grpc.StatusCode.CANCELLED] = Aborted


def code_for(err: TransferError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def from_rpc_error(err: grpc.RpcError, what: str) -> TransferError:
    """Map a failed call to the typed error; TLS handshake refusals become AuthError."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.UNAVAILABLE and _looks_like_tls_refusal(details):
        return AuthError(f"{what}: TLS handshake refused: {details}")
    fallback = PeerGone if code == grpc.StatusCode.UNAVAILABLE else ProtocolError
    cls = fallback if code is None else _FROM_CODE.get(code, fallback)
    # Receiver-side errors already name the request; do not say it twice.
    return cls(details if details.startswith(f"{what}:") else f"{what}: {details}")


def _looks_like_tls_refusal(details: str) -> bool:
    d = details.lower()
    return any(s in d for s in ("handshake", "ssl", "certificate", "tls"))
