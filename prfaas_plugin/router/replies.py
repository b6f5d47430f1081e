"""Error answers in the OpenAI shape, for the plain-ASGI hot path and the FastAPI endpoints."""

from __future__ import annotations

import json
import re

from fastapi.responses import Response

from prfaas_plugin.router.asgi import Reply, json_reply


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` (a 4xx) and ``message``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error(status: int, message: str, code: str, request_id: str | None) -> dict:
    """The OpenAI-style error object, as a whole answer and as a stream event carry it."""
    err: dict = {"message": message, "type": code, "code": status}
    if request_id is not None:
        err["request_id"] = request_id
    return {"error": err}


def error_reply(status: int, message: str, code: str = "invalid_request_error", request_id: str | None = None) -> Reply:
    return json_reply(_error(status, message, code, request_id), status)


def stream_error_event(status: int, message: str, code: str, request_id: str | None = None) -> bytes:
    """An error in the middle of a streamed answer, as an OpenAI-compatible server sends it: one
    server-sent event carrying the error object (the OpenAI SDKs raise on it), and no ``[DONE]``,
    so a client cannot take a cut answer for a finished one."""
    return b"data: " + json.dumps(_error(status, message, code, request_id)).encode() + b"\n\n"


_GAVE_UP = re.compile(rb'"finish_reason":\s*"(abort|error)"')


def engine_gave_up(content: bytes) -> str | None:
    """The finish reason of a 200 answer whose request the engine ended itself ("abort": it
    stopped or lost the request, as when its core process dies; "error": it failed it), else
    None. Such an answer carries no usable text, so it is an instance failure, not a reply."""
    m = _GAVE_UP.search(content)
    return m.group(1).decode() if m else None


def router_fault(request_id: str, exc: BaseException) -> Reply:
    """The router's own failure (a bug, not the client's nor an instance's): 500, with the
    request id the log line carries so the two can be matched."""
    return error_reply(
        500, f"internal router error ({type(exc).__name__}); request id {request_id}", "internal_error", request_id
    )


def error_response(
    status: int, message: str, code: str = "invalid_request_error", request_id: str | None = None
) -> Response:
    """``error_reply`` for the FastAPI endpoints."""
    reply = error_reply(status, message, code, request_id)
    return Response(reply.body, status_code=status, media_type=reply.headers["content-type"])
