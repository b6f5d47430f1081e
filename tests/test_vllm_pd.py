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

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

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
    ref = complete(pair.producer, PROMPT)
    res = _pd(pair, PROMPT)
    xfer = res.transfer
    assert xfer.get("status") == "sent", xfer
    wire = _received_bytes(pair, xfer["transfer_id"])
    print(f"\n[{pair.model}] bytes on the wire {wire} / layout prediction {xfer['bytes']} "
          f"({xfer['num_tokens']} tokens)")
    assert wire == xfer["bytes"]
    assert res.text == ref, f"P/D output differs from single instance:\n{res.text!r}\n{ref!r}"
