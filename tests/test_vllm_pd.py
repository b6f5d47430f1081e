"""End to end with real vLLM (CPU): prefill on a producer, decode on a consumer through the prfaas
connector, output token-for-token equal to a single-instance run, for each layer kind.

One producer/consumer pair per model, started once (60-100 s each). The single-instance reference is
the producer itself serving the same prompt without kv_transfer_params (greedy is deterministic).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from vllm_helpers import Supervisor, complete, requires_vllm, start_pair

# the first test of each model also pays for starting its pair (60-400 s on a loaded 2-core box)
pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm, pytest.mark.timeout(900)]

MODELS = ["tiny-qwen3", "tiny-qwen3next", "tiny-gemma3", "tiny-dsv3-mla"]
PROMPT = ("PrfaaS moves the KV cache of long prompts from a prefill cluster to decode instances. "
          "Sliding window attention only needs the tail of the sequence inside its window. ") * 3


@pytest.fixture(scope="module", params=MODELS)
def pair(request, tmp_path_factory):
    from prfaas_plugin.demo.tiny_models import build

    model = build(request.param, tmp_path_factory.getbasetemp() / "models")
    with Supervisor(tmp_path_factory.mktemp(f"logs-{request.param}")) as sup:
        p = start_pair(sup, model)
        p.model = request.param  # type: ignore[attr-defined]
        yield p


def _pd(pair, prompt: str, max_tokens: int = 24, deadline_s: float = 60.0):
    from prfaas_plugin.engines.vllm.pd_client import complete_pd

    async def go():
        async with httpx.AsyncClient(timeout=180) as c:
            return await complete_pd(c, pair.producer, pair.consumer, pair.decode_endpoint,
                                     {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, deadline_s)
    return asyncio.run(go())


def _received_bytes(pair, transfer_id: str) -> int:
    log = pair.sup.children["consumer"].log_path.read_text(errors="replace")
    m = re.search(rf"loaded transfer {transfer_id} for request \S+: (\d+) bytes", log)
    assert m, f"consumer did not log the load of {transfer_id}"
    return int(m.group(1))


def test_pd_equals_single_instance_and_bytes_match_layout(pair):
    received0 = _metric(pair.consumer, "vllm:prfaas_kv_received_bytes_total")
    ref = complete(pair.producer, PROMPT)
    res = _pd(pair, PROMPT)
    xfer = res.transfer
    assert xfer.get("status") == "sent", xfer
    wire = _received_bytes(pair, xfer["transfer_id"])
    print(f"\n[{pair.model}] bytes on the wire {wire} / layout prediction {xfer['bytes']} "
          f"({xfer['num_tokens']} tokens)")
    assert wire == xfer["bytes"]
    assert res.text == ref, f"P/D output differs from single instance:\n{res.text!r}\n{ref!r}"
    # the connector's own series on vLLM's /metrics (served by the API server, fed by the worker)
    got = _metric_reaches(pair.consumer, "vllm:prfaas_kv_received_bytes_total", received0 + wire)
    assert got == received0 + wire, (got, received0, wire)


def _metric(url: str, name: str) -> float:
    """Sum of every sample of ``name`` on the instance's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _metric_reaches(url: str, name: str, at_least: float, timeout_s: float = 30) -> float:
    """vLLM forwards connector stats from the worker with the next scheduler output: poll."""
    import time

    deadline = time.monotonic() + timeout_s
    v = _metric(url, name)
    while v < at_least and time.monotonic() < deadline:
        time.sleep(0.3)
        v = _metric(url, name)
    return v


def _usage(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)
    assert m, "no vllm:kv_cache_usage_perc in /metrics"
    return float(m.group(1))


def _settled_usage(url: str, want: float, timeout_s: float = 90) -> float:
    import time

    deadline = time.monotonic() + timeout_s
    u = _usage(url)
    while u != want and time.monotonic() < deadline:
        time.sleep(0.5)
        u = _usage(url)
    return u


def test_shared_prefix_cached_on_consumer(pair):
    """D already holds the prompt's first blocks: D leaves them alone and the output is still exact."""
    prefix = PROMPT * 6  # several attention blocks even at the hybrid's 640-token block size... within 2048
    complete(pair.consumer, prefix, max_tokens=1)  # caches the prefix on D
    prompt = prefix + " The quick brown fox jumps over the lazy dog."
    ref = complete(pair.producer, prompt)
    res = _pd(pair, prompt)
    assert res.transfer.get("status") == "sent", res.transfer
    assert res.text == ref


def test_failed_transfer_recomputes_and_frees_blocks(pair):
    """P pushes with a forged token, so D's receiver refuses the session (deterministic, unlike a
    deadline race): D recomputes locally with the same output, and both instances free every block."""
    from prfaas_plugin.engines.vllm.pd_client import PDResult, transfer_params

    p0, c0 = _settled_usage(pair.producer, 0.0), _settled_usage(pair.consumer, 0.0)
    failures0 = _metric(pair.consumer, "vllm:prfaas_kv_load_failures_total")
    prompt = PROMPT * 2
    ref = complete(pair.producer, prompt)
    p_params, c_params = transfer_params(pair.decode_endpoint, deadline_s=10)
    p_params["token"] = "forged-" + p_params["token"]  # the receiver must refuse this push

    async def go():
        async with httpx.AsyncClient(timeout=180) as c:
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
            rp, rc = await asyncio.gather(
                c.post(f"{pair.producer}/v1/completions",
                       json={**body, "max_tokens": 1, "kv_transfer_params": p_params}),
                c.post(f"{pair.consumer}/v1/completions", json={**body, "kv_transfer_params": c_params}))
            return PDResult(rc.json(), rp.json())
    res = asyncio.run(go())
    assert res.text == ref
    log = pair.sup.children["consumer"].log_path.read_text(errors="replace")
    assert "decode recomputes the prefill locally" in log
    assert _metric_reaches(pair.consumer, "vllm:prfaas_kv_load_failures_total", failures0 + 1) == failures0 + 1
    assert _settled_usage(pair.producer, p0) == p0, "producer leaked blocks"
    assert _settled_usage(pair.consumer, c0) == c0, "consumer leaked blocks"
