"""What a completion request must look like before the router tokenises and places it. Every
failure here is the client's: a :class:`ClientError` with a 4xx status and a message naming the
field."""

from __future__ import annotations

import json
import re
from typing import Any

from prfaas_plugin.router.replies import ClientError

#: A UTF-16 surrogate written as a JSON escape. A pair of them is one character and fine; one
#: alone decodes to a string that cannot be encoded again (the tokenizer and the relay fail).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


#: Deepest nesting of arrays and objects accepted. No OpenAI field nests nearly this deep; a
#: body that does would exhaust the recursion of the encoder that relays it (a RecursionError).
MAX_DEPTH = 64


def _too_deep(body: Any) -> bool:
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_body(raw: bytes) -> Any:
    """The JSON in ``raw`` (already size-checked by asgi.read_body), or a ClientError for bytes
    that are not UTF-8 JSON, nesting deeper than the parser recurses, integers too long to
    convert, and lone surrogates."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ClientError(400, "the request body nests too deeply") from None
    except ValueError as exc:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise ClientError(400, f"the request body holds a number this server does not read: {exc}") from None
    # Counting brackets is C-speed; only a body with many containers is walked for its depth.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and isinstance(body, (dict, list)) and _too_deep(body):
        raise ClientError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw) is not None:
        # Rare (escaped astral characters): only then is the parsed body checked whole.
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ClientError(400, "the request body holds a lone UTF-16 surrogate escape (not a character)") from None
    return body


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
    if "kv_transfer_params" in body:
        raise ClientError(400, "'kv_transfer_params' is set by the router; clients must not send it")
    if chat and "messages" not in body:
        raise ClientError(400, "'messages' is required")
    if not chat and "prompt" not in body:
        raise ClientError(400, "'prompt' is required")
    return body
