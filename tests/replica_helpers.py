"""Neighbours of several router replicas under test: fake engines that, like vLLM with
``--kv-events-config``, publish the blocks they cache over ZMQ and export their running and
waiting requests on /metrics; and a router run as its own process (so it can be killed or sent
SIGTERM like a pod)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi import Request
from fastapi.responses import PlainTextResponse
from router_helpers import FakeBackend

from prfaas_plugin.demo.ports import free_port
from prfaas_plugin.faults.matrix import until
from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.router.tokenize import PromptTokenizer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class EngineFake(FakeBackend):
    """A :class:`FakeBackend` that publishes vLLM KV events (``BlockStored`` for every full block
    of each prompt it serves, before it answers) and vLLM's queue gauges: its open requests plus
    ``extra_running``, and ``extra_waiting`` (load from traffic the test does not send)."""

    tokenizer: PromptTokenizer | None = None
    block_size: int = 4
    extra_running: int = 0
    extra_waiting: int = 0
    events_port: int = field(default_factory=free_port)
    published: int = 0  # batches published

    def __post_init__(self) -> None:
        super().__post_init__()
        import zmq

        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://127.0.0.1:{self.events_port}")
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    def stop(self) -> None:
        super().stop()
        self._sock.close()

    def _publish(self, events: list[Any]) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        payload = msgspec.msgpack.encode(KVEventBatch(ts=time.time(), events=events))
        with self._lock:
            self._seq += 1
            self._sock.send_multipart([b"kv", self._seq.to_bytes(8, "big"), payload])
            self.published += 1

    def clear(self) -> None:
        """Publish ``AllBlocksCleared`` (also how a test checks its subscribers are connected)."""
        from vllm.distributed.kv_events import AllBlocksCleared

        self._publish([AllBlocksCleared()])

    def _store(self, body: dict) -> None:
        from vllm.distributed.kv_events import BlockStored

        assert self.tokenizer is not None
        prompt = body.get("prompt")
        tokens = self.tokenizer.completion_tokens(prompt) if prompt is not None else []
        n = len(tokens) // self.block_size * self.block_size
        if n == 0:
            return
        hashes, parent = [], b""
        for start in range(0, n, self.block_size):
            parent = hashlib.sha256(parent + repr(tokens[start : start + self.block_size]).encode()).digest()[:8]
            hashes.append(parent)
        stored = BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=tokens[:n],
            block_size=self.block_size,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        self._publish([stored])

    async def _answer(self, request: Request, chat: bool) -> Any:
        resp = await super()._answer(request, chat)
        if getattr(resp, "status_code", 200) == 200:
            self._store(await request.json())
        return resp

    async def _metrics(self) -> Any:
        running, waiting = M.ENGINE_VLLM_RUNNING.exposed, M.ENGINE_VLLM_WAITING.exposed
        text = (
            f"# TYPE {running} gauge\n"
            f'{running}{{engine="0",model_name="m"}} {self.open_requests + self.extra_running}\n'
            f"# TYPE {waiting} gauge\n"
            f'{waiting}{{engine="0",model_name="m"}} {self.extra_waiting}\n'
        )
        return PlainTextResponse(text)


def subscribers_ready(routers: list[Any], engines: list[EngineFake], timeout_s: float = 15.0) -> None:
    """Publish until every router's subscriber of every engine has applied a batch (ZMQ drops
    what a PUB socket sends before a subscriber joined)."""

    def ready() -> bool:
        for e in engines:
            if any(s.applied == 0 for r in routers for s in r._subscribers if s.instance == e.url):
                e.clear()
                return False
        return True

    assert until(ready, timeout_s, 0.1), "KV-event subscribers never connected"


def events_applied(routers: list[Any], engines: list[EngineFake], timeout_s: float = 10.0) -> None:
    """Wait until every router has applied every batch each engine published."""

    def done() -> bool:
        return all(
            s.applied >= e.published for e in engines for r in routers for s in r._subscribers if s.instance == e.url
        )

    assert until(done, timeout_s, 0.01), "KV events did not reach every router"


class RouterProcess:
    """``prfaas router`` in a child process (the way a pod runs it)."""

    def __init__(self, cfg: dict, tmp: Path, name: str) -> None:
        self.port = free_port()
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(tmp / f"{name}.log", "w")
        cmd = [sys.executable, "-c", "from prfaas_plugin.cli import main; main()"]
        cmd += ["router", "--config", str(path), "--port", str(self.port)]
        cmd += ["--host", "127.0.0.1", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self._log_path = tmp / f"{name}.log"

    def wait_up(self) -> RouterProcess:
        """Wait until it serves /health (start several, then wait: their start-ups overlap)."""
        ok = until(self._up, 90, 0.2) and self.proc.poll() is None
        assert ok, f"router did not start: {self._log_path.read_text()[-2000:]}"
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            return True  # exited: the assert after reports it
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
