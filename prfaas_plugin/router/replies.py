"""Error answers in the OpenAI shape, for the plain-ASGI hot path and the FastAPI endpoints."""

from __future__ import annotations

from fastapi.responses import Response

from prfaas_plugin.router.asgi import Reply, json_reply


class ClientError(Exception):
    """A request the client got wrong: answered with ``status`` (a 4xx) and ``message``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_reply(status: int, message: str, code: str = "invalid_request_error") -> Reply:
    return json_reply({"error": {"message": message, "type": code, "code": status}}, status)


def error_response(status: int, message: str, code: str = "invalid_request_error") -> Response:
    """``error_reply`` for the FastAPI (admin) endpoints."""
    reply = error_reply(status, message, code)
    return Response(reply.body, status_code=status, media_type=reply.headers["content-type"])
