"""Neighbours of the router under test: fake OpenAI backends (real HTTP servers on loopback,
behaving like vLLM instances with the prfaas connector) and a tiny offline tokenizer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from prfaas_plugin.demo.ports import free_port
from prfaas_plugin.router.app import create_app
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.tokenize import PromptTokenizer

WORDS = [f"w{i}" for i in range(200)]


def build_tokenizer(path: Path) -> Path:
    """A word-level tokenizer (one token per whitespace-separated word, no special tokens) with a
    chat template: prompt lengths in tests are exact word counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "user:", "assistant:", "system:", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(path))
    return path


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@dataclass
class Seen:
    path: str
    body: dict
    at: float
    aborted: bool = False
    finished_at: float | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class FakeBackend:
    """role: "prefill" answers like a prfaas producer; "decode"/"both" like a consumer."""

    role: str
    prefill_delay_s: float = 0.0
    decode_delay_s: float = 0.0
    kv_bytes_per_token: int = 1000
    status: int = 200
    health_delay_s: float = 0.0  # a /health that answers late, like an engine busy in a long prefill
    transfer_status: str = "sent"
    finish_reason: str = "stop"  # "abort": how vLLM ends a request its engine core lost
    role_switch_status: int = 200  # SGLang's /pd_role_switch: 400 plays a server without --enable-pd-role-switch
    #: A producer's vllm:prfaas_kv_sent_bytes_total on /metrics (None: no /metrics, a 404)
    sent_bytes_counter: float | None = None
    sent_bytes_prefix: str = "vllm"  # "sglang": the SGLang backend's counter instead
    #: A producer asked NIXL's ``do_remote_decode`` answers like vLLM's NixlConnector; False plays
    #: a server without it (vLLM then answers no kv_transfer_params)
    nixl: bool = True
    seen: list[Seen] = field(default_factory=list)
    switches: list[dict] = field(default_factory=list)  # /pd_role_switch bodies, with the requests open then
    open_requests: int = 0
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.app = FastAPI()
        self.app.post("/v1/completions")(self._completions)
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.get("/health")(self._health)
        self.app.post("/pd_role_switch")(self._pd_role_switch)
        self.app.get("/metrics")(self._metrics)
        self.app.post("/tokenize")(self._tokenize)
        self.app.get("/version")(self._version)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeBackend:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    async def _metrics(self) -> Any:
        if self.sent_bytes_counter is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        name = f"{self.sent_bytes_prefix}:prfaas_kv_sent_bytes"
        text = (
            f"# HELP {name}_total KV bytes the receiver confirmed (producer side)\n"
            f"# TYPE {name}_total counter\n"
            f'{name}_total{{engine="0",model_name="m"}} {self.sent_bytes_counter}\n'
            f'{name}_created{{engine="0",model_name="m"}} 1.7e9\n'
        )
        return PlainTextResponse(text)

    async def _tokenize(self, request: Request) -> Any:
        body = await request.json()
        self.seen.append(Seen(request.url.path, body, time.monotonic(), headers=dict(request.headers)))
        return {"count": len(str(body.get("prompt", "")).split()), "tokens": [], "served_by": self.url}

    async def _version(self) -> dict:
        return {"version": "fake", "served_by": self.url}

    async def _health(self) -> dict:
        await asyncio.sleep(self.health_delay_s)
        return {"ok": True}

    def wait_seen(self, n: int = 1, timeout_s: float = 5.0) -> list[Seen]:
        """The router sends a pair's two requests concurrently and answers the client from one of
        them, so the other may reach this fake a moment after the client has its reply."""
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.seen

    def text_for(self, body: dict) -> str:
        src = body.get("prompt") if "prompt" in body else json.dumps(body.get("messages"))
        return f"echo[{len(str(src))}]"

    async def _pd_role_switch(self, request: Request) -> Any:
        body = await request.json()
        self.switches.append({**body, "open_requests": self.open_requests})
        if self.role_switch_status != 200:
            return JSONResponse(
                {
                    "success": False,
                    "message": "--enable-pd-role-switch is not set on this server",
                    "old_role": self.role,
                    "new_role": body.get("new_role", ""),
                },
                status_code=self.role_switch_status,
            )
        if self.open_requests:
            return JSONResponse(
                {"success": False, "message": "instance is not idle; drain all requests before switching"},
                status_code=400,
            )
        old, self.role = self.role, body["new_role"]
        return {"success": True, "message": "ok", "old_role": old, "new_role": self.role}

    async def _completions(self, request: Request) -> Any:
        return await self._serve(request, chat=False)

    async def _chat(self, request: Request) -> Any:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Any:
        self.open_requests += 1
        streaming = False
        try:
            resp = await self._answer(request, chat)
            streaming = isinstance(resp, StreamingResponse)
            return resp
        finally:
            if not streaming:
                self.open_requests -= 1

    async def _answer(self, request: Request, chat: bool) -> Any:
        body = await request.json()
        rec = Seen(request.url.path, body, time.monotonic(), headers=dict(request.headers))
        self.seen.append(rec)
        if self.status != 200:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=self.status)
        params = body.get("kv_transfer_params")
        text = self.text_for(body)
        if self.role == "prefill":
            # Wait like a prefill, noticing a client that goes away (vLLM aborts then).
            t_end = time.monotonic() + self.prefill_delay_s
            while time.monotonic() < t_end:
                if await request.is_disconnected():
                    rec.aborted = True
                    return JSONResponse({}, status_code=499)
                await asyncio.sleep(0.01)
            rec.finished_at = time.monotonic()
            n = len(str(body.get("prompt") or body.get("messages")).split())
            if (params or {}).get("do_remote_decode"):
                nixl = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_block_ids": [list(range(1, n // 16 + 2))],
                    "remote_engine_id": f"engine-{self.port}",
                    "remote_request_id": f"cmpl-{len(self.seen)}",
                    "remote_host": "127.0.0.1",
                    "remote_port": self.port + 1,
                    "tp_size": 1,
                }
                return {
                    "id": "p",
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                    "kv_transfer_params": nixl if self.nixl else None,
                }
            kvp = {
                "prfaas_version": 1,
                "transfer_id": (params or {}).get("transfer_id"),
                "status": self.transfer_status,
                "bytes": n * self.kv_bytes_per_token,
            }
            if self.transfer_status == "failed":
                kvp["error"] = "injected transfer failure"
            return {
                "id": "p",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                "kv_transfer_params": kvp,
            }
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            await asyncio.sleep(self.decode_delay_s)
            rec.finished_at = time.monotonic()
            n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 1) > 0 else 1
            choices = []
            for i in range(min(n, 16)):  # like vLLM, one choice per sample
                choice = {"index": i, "finish_reason": self.finish_reason}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                choices.append(choice)
            return {
                "id": "d",
                "object": obj,
                "created": 0,
                "model": body.get("model"),
                "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        async def gen():
            try:
                await asyncio.sleep(self.decode_delay_s)
                for piece in [text[: len(text) // 2], text[len(text) // 2 :]]:
                    delta = {"delta": {"content": piece}} if chat else {"text": piece}
                    chunk = {
                        "id": "d",
                        "object": obj + (".chunk" if chat else ""),
                        "created": 0,
                        "model": body.get("model"),
                        "choices": [{"index": 0, **delta, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.05)
                yield "data: [DONE]\n\n"
                rec.finished_at = time.monotonic()
            except (asyncio.CancelledError, GeneratorExit):
                rec.aborted = True
                raise
            finally:
                self.open_requests -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")


class RunningRouter:
    def __init__(self, cfg: RouterConfig, tokenizer: PromptTokenizer, port: int | None = None) -> None:
        self.app = create_app(cfg, tokenizer)
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def router(self):
        return self.app.state.router

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=30, **kw)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
