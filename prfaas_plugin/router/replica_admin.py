"""Admin endpoints for running several router replicas (docs/router-replicas.md).

- ``POST /admin/decide``: where this replica would place a completion request now (route and
  instances), without sending it. Comparing two replicas' answers for the same body shows
  whether they agree; the replica tests measure agreement with it.
- ``GET /admin/lengths``: this replica's recent uncached lengths, which its peers merge into
  their re-optimisation of t* (peers.py).
- ``GET /admin/instances``: each instance's health, this replica's open requests, the engine's
  reported queue and the load placement uses.
- ``POST /admin/instances/drain``: take an instance out of routing (``{"url": ..., "drain":
  true}``) before a rolling update of that engine, or put it back (``"drain": false``). Its open
  requests finish; new ones go elsewhere. The flag is this replica's: send it to every replica
  (their pod addresses, not the Service), as the docs show.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from prfaas_plugin.router.policy import NoInstance
from prfaas_plugin.router.replies import ClientError, error_response
from prfaas_plugin.router.service import Router
from prfaas_plugin.router.tokenize import PromptError
from prfaas_plugin.router.validate import parse_body, validate_completion


def install(app: FastAPI, router: Router) -> None:
    @app.post("/admin/decide")
    async def decide_(request: Request, chat: bool = False) -> Response:
        raw = await request.body()
        if len(raw) > router.cfg.body_limit:
            return error_response(
                413, f"the request body is over {router.cfg.body_limit} bytes (router config: max_body_bytes)"
            )
        try:
            body = validate_completion(parse_body(raw), chat, router.cfg.model)
            if chat:
                tokens = router.tokenizer.chat_tokens(body["messages"], body)
            else:
                tokens = router.tokenizer.completion_tokens(body["prompt"])
            if not tokens:
                raise ClientError(400, "the prompt is empty")
            d, overloaded = router.place(tokens)
        except ClientError as exc:
            return error_response(exc.status, exc.message, exc.code)
        except PromptError as exc:
            return error_response(400, str(exc))
        except NoInstance as exc:
            return error_response(503, str(exc), "service_unavailable")
        return JSONResponse(
            {
                "route": d.route,
                "prefill": d.prefill.url if d.prefill else None,
                "decode": d.decode.url,
                "l_total": d.l_total,
                "l_prefix": d.l_prefix,
                "l_uncached": d.l_uncached,
                "threshold_tokens": d.threshold,
                "prfaas_overloaded": overloaded,
                "reason": d.reason,
            }
        )

    @app.get("/admin/lengths")
    async def lengths() -> dict:
        return {"replica": router.loops.replica_id, "lengths": router.controller.recent_lengths()}

    @app.get("/admin/instances")
    async def instances() -> dict:
        return {"instances": router.fleet.health_report()}

    @app.post("/admin/instances/drain")
    async def drain(request: Request) -> Response:
        usage = 'send {"url": "<instance url>", "drain": true|false}'
        try:
            body: Any = parse_body(await request.body())
        except ClientError as exc:
            return error_response(exc.status, f"{exc.message}; {usage}")
        try:
            url, flag = body["url"], body.get("drain", True)
            if not isinstance(url, str) or not isinstance(flag, bool):
                raise TypeError
            url = url.rstrip("/")
        except (KeyError, TypeError, AttributeError):
            return error_response(400, usage)
        inst = next((i for i in router.fleet.instances if i.url == url), None)
        if inst is None:
            return error_response(404, f"no instance {url!r}; GET /admin/instances lists them", "not_found")
        inst.draining = flag
        return JSONResponse({"url": inst.url, "draining": inst.draining, "inflight": inst.inflight})
