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
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas_plugin.router.asgi import Receive, Scope, Send, send_reply
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.replica_admin import install as install_replica_admin
from prfaas_plugin.router.replies import error_reply, error_response
from prfaas_plugin.router.service import Router
from prfaas_plugin.router.tokenize import PromptTokenizer

log = logging.getLogger("prfaas.router")


class RouterApp:
    """The ASGI app ``prfaas router`` serves: the completion endpoints on plain ASGI, every other
    endpoint and the lifespan on FastAPI."""

    COMPLETIONS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat

    def __init__(self, router: Router, admin: FastAPI) -> None:
        self.router = router
        self.admin = admin

    @property
    def state(self) -> Any:
        return self.admin.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            chat = self.COMPLETIONS.get(scope["path"])
            if chat is not None:
                if scope["method"] == "POST":
                    await self.router.serve(scope, receive, send, scope["path"], chat)
                else:
                    reply = error_reply(405, f"{scope['method']} is not allowed here; send POST")
                    reply.headers["allow"] = "POST"
                    await send_reply(reply, send)
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

    app = FastAPI(title="prfaas router", lifespan=lifespan)
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
        router.loops.tick()
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/threshold")
    async def get_threshold() -> dict:
        return {**router.controller.snapshot(), "egress_counters": dict(router.egress.last)}

    @app.put("/admin/threshold")
    async def put_threshold(request: Request) -> Response:
        try:
            body = await request.json()
            tokens = float(body["threshold_tokens"])
            if tokens < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return error_response(400, 'send {"threshold_tokens": <number >= 0>}')
        router.controller.set_fixed(tokens)
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
    async def requests_(limit: int = 100) -> dict:
        return {"requests": [r.as_dict() for r in router.records.last(limit)]}

    install_replica_admin(app, router)

    @app.exception_handler(Exception)
    async def _unhandled(_request: Request, exc: Exception) -> Response:  # pragma: no cover - last resort
        log.exception("unhandled router error: %s", exc)
        return error_response(502, f"upstream or router failure: {type(exc).__name__}", "upstream_error")

    return RouterApp(router, app)
