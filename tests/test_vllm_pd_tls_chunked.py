"""End to end with real vLLM (CPU) on the hybrid tiny model (tiny-qwen3next: GDN state + full
attention), one producer/consumer pair with transfer TLS and mutual TLS on and chunked prefill
(``--max-num-batched-tokens`` well below the long prompt):

* a short and a 12K-token prompt decode to the single-instance output, the long one with its
  full-attention KV streamed chunk by chunk (the producer logs how many items left before the
  last chunk);
* a producer whose client certificate the consumer's CA did not sign is refused (``AuthError``),
  and the consumer's request still answers, by recomputing the prefill locally.

The single-instance reference is the producer serving the prompt without kv_transfer_params
(same chunk budget). Greedy tokens may only differ on a near-tie (``compare_greedy``)."""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import pytest
from transfer_helpers import make_pki
from vllm_helpers import Supervisor, compare_greedy, requires_vllm, start_pair

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm, pytest.mark.timeout(1500)]

MODEL = "tiny-qwen3next"
BUDGET = 2048  # tokens per step: a 12K prompt takes 6 chunks
MAX_LEN = 12800
LONG_TOKENS = 12_000
SENTENCES = (
    "PrfaaS moves the KV cache of long prompts from a prefill cluster to decode instances. ",
    "Hybrid models keep a recurrent state for linear layers and a cache for attention layers. ",
    "The quick brown fox jumps over the lazy dog while the router picks a prefill node. ",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_models_dir, pki):
    from prfaas_plugin.demo.tiny_models import build

    model = build(MODEL, tiny_models_dir)
    ca = pki["ca.paths"][0]
    server, client = pki["server"], pki["client"]
    with Supervisor(tmp_path_factory.mktemp("logs-tls-chunked"), own_sessions=False) as sup:
        p = start_pair(
            sup,
            model,
            producer_extra={"tls_cert": client[0], "tls_key": client[1], "tls_ca": ca},
            argv=[
                "--max-model-len",
                str(MAX_LEN),
                # the tiny configs say 4096 positions; RoPE extends to the longer context unchanged
                "--hf-overrides",
                f'{{"max_position_embeddings": {MAX_LEN}}}',
                "--enable-chunked-prefill",
                "--max-num-batched-tokens",
                str(BUDGET),
            ],
            tls_cert=server[0],
            tls_key=server[1],
            tls_ca=ca,
            tls_require_client_cert=True,
        )
        p.model_dir = model  # type: ignore[attr-defined]
        yield p


def _long_prompt(model_dir) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    per = len(tok("".join(SENTENCES)).input_ids)
    text = "".join(SENTENCES) * (LONG_TOKENS // per + 1)
    ids = tok(text).input_ids[:LONG_TOKENS]
    return tok.decode(ids)


def _body(prompt: str, max_tokens: int = 16) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 3}


def _single(pair, prompt: str) -> dict:
    r = httpx.post(f"{pair.producer}/v1/completions", json=_body(prompt), timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]


def _pd(pair, prompt: str, deadline_s: float = 300.0):
    from prfaas_plugin.engines.vllm.pd_client import complete_pd

    # a fresh cache salt: the reference run left the prompt in the producer's prefix cache, and a
    # hit would leave only the last chunk to compute (nothing to stream)
    body = {**_body(prompt), "cache_salt": uuid.uuid4().hex}

    async def go():
        async with httpx.AsyncClient(timeout=900) as c:
            return await complete_pd(c, pair.producer, pair.consumer, pair.decode_endpoint, body, deadline_s)

    return asyncio.run(go())


def _log(pair, who: str) -> str:
    return pair.sup.children[who].log_path.read_text(errors="replace")


def test_short_prompt_over_mtls_equals_single_instance(pair):
    prompt = "".join(SENTENCES) * 2
    ref = _single(pair, prompt)
    res = _pd(pair, prompt)
    assert res.transfer.get("status") == "sent", res.transfer
    assert compare_greedy(ref, res.consumer["choices"][0]) == "exact"
    assert f"loaded transfer {res.transfer['transfer_id']}" in _log(pair, "consumer")


def test_12k_prompt_streams_chunks_over_mtls_and_equals_single_instance(pair):
    prompt = _long_prompt(pair.model_dir)
    ref = _single(pair, prompt)
    assert ref["text"], "the single-instance run produced nothing"
    res = _pd(pair, prompt)
    xfer = res.transfer
    assert xfer.get("status") == "sent", xfer
    assert xfer["num_tokens"] >= LONG_TOKENS - 2
    verdict = compare_greedy(ref, res.consumer["choices"][0])
    print(f"\n[{MODEL} 12K, {BUDGET}-token chunks over mTLS] {verdict}: {res.text!r} vs {ref['text']!r}")
    assert verdict in ("exact", "near-tie"), f"P/D differs from single instance:\n{res.text!r}\n{ref['text']!r}"
    m = re.search(
        rf"transfer {xfer['transfer_id']}: (\d+) of (\d+) layer items streamed before the last chunk",
        _log(pair, "producer"),
    )
    assert m, "the producer sent everything in the last step (no chunk was streamed)"
    streamed, total = int(m.group(1)), int(m.group(2))
    print(f"[{MODEL} 12K] {streamed} of {total} items left before the last chunk")
    assert 0 < streamed < total  # earlier chunks' attention KV early; the last chunk's and the state at the end
    assert f"loaded transfer {xfer['transfer_id']}" in _log(pair, "consumer")


def test_untrusted_client_certificate_is_refused_and_decode_recomputes(pair, pki):
    """A producer presenting a certificate from another CA cannot open the session; the consumer's
    load fails at its deadline and vLLM recomputes the prompt there: same answer."""
    from concurrent.futures import wait

    from prfaas_plugin.protocol.requests import transfer_params
    from prfaas_plugin.transfer import AuthError, ItemSpec, LayoutFingerprint, TransferManifest
    from prfaas_plugin.transfer.binding import EndpointSpec, EngineTransport, TlsOptions

    prompt = "".join(reversed(SENTENCES)) * 2
    ref = _single(pair, prompt)
    p_params, c_params = transfer_params(pair.decode_endpoint, 8.0)
    rogue = EngineTransport(
        EndpointSpec("rogue", "x", TlsOptions(*pki["rogue-client"], ca=pki["ca.paths"][0]))
    ).sender()
    try:

        async def go():
            async with httpx.AsyncClient(timeout=300) as c:
                fut = c.post(f"{pair.consumer}/v1/completions", json={**_body(prompt), "kv_transfer_params": c_params})
                task = asyncio.ensure_future(fut)
                await asyncio.sleep(1.0)
                manifest = TransferManifest(
                    p_params["transfer_id"], (ItemSpec("g0.b0.n1.p0.x", 16),), LayoutFingerprint({}), sender_id="rogue"
                )
                h = rogue.open(pair.decode_endpoint, manifest, p_params["token"], deadline_s=8.0)
                return h, await task

        h, r = asyncio.run(go())
        wait([h.done], timeout=30)
        assert isinstance(h.done.exception(), AuthError), h.done.exception()
        r.raise_for_status()
        assert compare_greedy(ref, r.json()["choices"][0]) == "exact"
        assert re.search(r"KV load for request \S+ failed .*recomputes", _log(pair, "consumer"))
    finally:
        rogue.close()
