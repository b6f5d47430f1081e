"""Who may call the router: bearer keys as vLLM takes them (``Authorization: Bearer <key>``),
a separate admin credential for ``/admin/*``, and the key the router itself sends the engines.

Why a check on the raw ASGI scope rather than a FastAPI dependency: the completion endpoints do
not run on FastAPI (asgi.py), and the check must come before the body is read, so a client
without a key cannot make the router read and parse megabytes. It costs one header lookup and
one ``hmac.compare_digest`` per configured key (constant time: a wrong key's timing does not
tell how much of it was right).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from prfaas_plugin.router.asgi import Reply, Scope
from prfaas_plugin.router.config import AuthSpec, KeySource, RouterConfigError, is_loopback_host
from prfaas_plugin.router.replies import error_reply

#: Paths served without a key unless the config protects them.
HEALTH, METRICS = "/health", "/metrics"
ADMIN_PREFIX = "/admin"


def read_keys(src: KeySource, what: str) -> tuple[str, ...]:
    """Every key ``src`` names; a named file or variable that is missing or empty is an error."""
    keys = list(src.keys)
    if src.file:
        try:
            text = Path(src.file).read_text()
        except OSError as exc:
            raise RouterConfigError(f"{what}.file: cannot read {src.file!r}: {exc}") from None
        found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise RouterConfigError(f"{what}.file: {src.file!r} holds no key")
        keys += found
    if src.env:
        value = os.environ.get(src.env, "")
        found = [k.strip() for k in value.split(",") if k.strip()]
        if not found:
            raise RouterConfigError(f"{what}.env: the environment variable {src.env} is unset or empty")
        keys += found
    for k in keys:
        if not k or not k.isascii() or not k.isprintable() or any(c.isspace() for c in k):
            raise RouterConfigError(f"{what}: a key must be printable ASCII without spaces")
    return tuple(dict.fromkeys(keys))


def _matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    ok = False
    for k in keys:  # every key is compared: the time does not depend on which one matched
        ok |= hmac.compare_digest(token, k)
    return ok


def _is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    return client is not None and is_loopback_host(client[0])


class Auth:
    """The router's access rules, read once at start from ``auth:`` in the router config."""

    def __init__(self, spec: AuthSpec) -> None:
        self.user = tuple(k.encode() for k in read_keys(spec.api_keys, "auth.api_keys"))
        self.admin = tuple(k.encode() for k in read_keys(spec.admin_keys, "auth.admin_keys"))
        self.protect_health, self.protect_metrics = spec.protect_health, spec.protect_metrics
        upstream = read_keys(spec.upstream_api_key, "auth.upstream_api_key")
        if len(upstream) > 1:
            raise RouterConfigError("auth.upstream_api_key: give exactly one key (the engines' --api-key)")
        #: The key the router sends every engine, or None.
        self.upstream_key: str | None = upstream[0] if upstream else None
        self._any = self.user + self.admin
        #: The key this replica sends its peers' ``/admin/lengths`` (replicas share one config, so
        #: their admin keys): the first admin key, or None (then peers answer loopback callers only).
        self.peer_key: str | None = self.admin[0].decode() if self.admin else None

    @staticmethod
    def _token(scope: Scope) -> bytes | None:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                return token.strip() if scheme.lower() == b"bearer" else None
        return None

    def check(self, scope: Scope) -> Reply | None:
        """None if the request may go on, else the 401/403 answer to send instead."""
        path: str = scope["path"]
        if path.startswith(ADMIN_PREFIX) and (len(path) == len(ADMIN_PREFIX) or path[len(ADMIN_PREFIX)] == "/"):
            return self._check_admin(scope)
        if path == HEALTH:
            needed = self.protect_health
        elif path == METRICS:
            needed = self.protect_metrics
        else:
            needed = bool(self.user)  # no user keys: the OpenAI endpoints are open, as vLLM's
        if not needed:
            return None
        token = self._token(scope)
        if token is not None and _matches(token, self._any):
            return None
        return _unauthorized()

    def _check_admin(self, scope: Scope) -> Reply | None:
        if not self.admin:
            if _is_loopback(scope):
                return None
            return error_reply(
                403,
                "the admin endpoints answer loopback clients only; set auth.admin_keys to reach them from elsewhere",
                "permission_error",
            )
        token = self._token(scope)
        if token is not None and _matches(token, self.admin):
            return None
        if token is not None and _matches(token, self.user):
            return error_reply(403, "this key may not use the admin endpoints", "permission_error")
        return _unauthorized()


def _unauthorized() -> Reply:
    reply = error_reply(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "authentication_error")
    reply.headers["www-authenticate"] = "Bearer"
    return reply
