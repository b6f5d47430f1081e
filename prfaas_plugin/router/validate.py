"""What a completion request must look like before the router tokenises and places it. Every
failure here is the client's: a :class:`ClientError` with a 4xx status and a message naming the
field."""

from __future__ import annotations

import json
from typing import Any

from prfaas_plugin.router.replies import ClientError


def parse_body(raw: bytes, max_bytes: int) -> Any:
    if len(raw) > max_bytes:
        raise ClientError(413, f"request body over {max_bytes >> 20} MiB")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"the request body is not valid JSON: {exc}") from None


def validate_completion(body: Any, chat: bool, model: str) -> dict[str, Any]:
    """``body`` as a dict if it is a completion (``chat``: a chat completion) for ``model``."""
    if not isinstance(body, dict):
        raise ClientError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ClientError(400, "'model' is required and must be a string")
    if name != model:
        raise ClientError(404, f"the model {name!r} does not exist; this router serves {model!r}", "model_not_found")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ClientError(400, "'stream' must be a boolean")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ClientError(400, f"'{key}' must be a positive integer")
    if body.get("n", 1) != 1:
        raise ClientError(400, "'n' > 1 is not supported by the PrfaaS router")
    if "kv_transfer_params" in body:
        raise ClientError(400, "'kv_transfer_params' is set by the router; clients must not send it")
    if chat and "messages" not in body:
        raise ClientError(400, "'messages' is required")
    if not chat and "prompt" not in body:
        raise ClientError(400, "'prompt' is required")
    return body
