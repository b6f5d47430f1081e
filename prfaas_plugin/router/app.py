"""The router's HTTP front: an OpenAI-compatible service whose completion endpoints run on plain
ASGI (asgi.py says why) and whose other endpoints -- models, health, metrics, admin -- and
lifespan run on FastAPI.

How one request is placed and carried out: service.py (the router), policy.py (the decision),
flow.py (producer, consumer, fallback), pd.py (what differs per engine). docs/architecture.md
draws the whole path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from prfaas_plugin.router.asgi import Receive, Scope, Send, send_reply
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.replica_admin import install as install_replica_admin
from prfaas_plugin.router.replies import error_reply, error_response, router_fault
from prfaas_plugin.router.service import Router
from prfaas_plugin.router.tokenize import PromptTokenizer

log = logging.getLogger("prfaas.router")


class RouterApp:
    """The ASGI app ``prfaas router`` serves: the completion endpoints on plain ASGI, every other
    endpoint and the lifespan on FastAPI."""

    COMPLETIONS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat
    #: Passed to a healthy instance as they are: path -> method.
    PASSTHROUGH = {"/tokenize": "POST", "/detokenize": "POST", "/version": "GET"}

    def __init__(self, router: Router, admin: FastAPI) -> None:
        self.router = router
        self.admin = admin

    @property
    def state(self) -> Any:
        return self.admin.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self.router.auth.check(scope)  # before any of the body is read
            if refused is not None:
                await send_reply(refused, send)
                return
            path = scope["path"]
            chat = self.COMPLETIONS.get(path)
            method = "POST" if chat is not None else self.PASSTHROUGH.get(path)
            if method is not None:
                if scope["method"] != method:
                    reply = error_reply(405, f"{scope['method']} is not allowed here; send {method}")
                    reply.headers["allow"] = method
                    await send_reply(reply, send)
                elif chat is not None:
                    await self.router.serve(scope, receive, send, path, chat)
                else:
                    await self.router.passthrough(scope, receive, send, method.encode())
                return
        await self.admin(scope, receive, send)  # type: ignore[arg-type]  # ASGI dicts are mutable mappings


def create_app(cfg: RouterConfig, tokenizer: PromptTokenizer | None = None) -> RouterApp:
    router = Router(cfg, tokenizer or PromptTokenizer(cfg.tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="prfaas router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.router = router

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "prfaas-router"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        report = router.fleet.health_report()
        local_ok = any(i.healthy and i.can_decode for i in router.fleet.of_kind("local"))
        status = 200 if local_ok else 503
        return JSONResponse(
            {
                "status": "ok" if local_ok else "unavailable",
                "instances": report,
                "threshold_tokens": router.controller.t,
            },
            status_code=status,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        router.loops.refresh_gauges()
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/threshold")
    async def get_threshold() -> dict:
        return {**router.controller.snapshot(), "egress_counters": dict(router.egress.last)}

    @app.put("/admin/threshold")
    async def put_threshold(request: Request) -> Response:
        top = cfg.threshold.max_tokens
        try:
            body = json.loads(await request.body())
            tokens = body["threshold_tokens"]
            if not isinstance(tokens, (int, float)) or isinstance(tokens, bool):
                raise TypeError
            if not (math.isfinite(tokens) and 0 <= tokens <= top):
                raise ValueError
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers too long to read;
        # OverflowError an integer too large for a float.
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
            return error_response(400, f'send {{"threshold_tokens": <a number from 0 to {top:g}>}}')
        router.controller.set_fixed(float(tokens))
        return JSONResponse(router.controller.snapshot())

    @app.get("/admin/split")
    async def split() -> dict:
        adv = router.controller.advice
        splitter = router.splitter
        return {
            "advice": None if adv is None else adv.__dict__,
            "applying": splitter is not None,
            "switches": [] if splitter is None else splitter.history[-20:],
            "note": "long-term loop: recommended local prefill/decode instance counts for the observed lengths",
        }

    @app.get("/admin/requests")
    async def requests_(limit: int = Query(100, ge=1, le=10_000)) -> dict:
        return {"requests": [r.as_dict() for r in router.records.last(limit)]}

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"invalid request: {where}")

    install_replica_admin(app, router)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> Response:  # pragma: no cover - last resort
        rid = request.headers.get("x-request-id") or os.urandom(16).hex()
        log.exception("request_id=%s: unhandled router error: %s", rid, exc)
        reply = router_fault(rid, exc)
        return Response(reply.body, status_code=500, media_type="application/json")

    return RouterApp(router, app)
