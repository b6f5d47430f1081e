"""Property-based fuzzing of the router's HTTP front (issue #24): thousands of generated request
bodies (arbitrary JSON, OpenAI-shaped bodies with wrong types and odd values, raw bytes, broken
escapes) and headers, sent to a real router in front of healthy fake engines.

Properties: no answer is a 5xx (the engines are healthy, so a 5xx could only be the router's
own fault); every error is an OpenAI-style error body; the router stays healthy; once all is
answered, no instance has a request counted in flight and no engine holds an open request.

Why Hypothesis directly and not Schemathesis: the completion endpoints run on plain ASGI and are
not in the FastAPI OpenAPI schema, and the bodies worth sending are mostly the ones a schema
would call invalid. The case counts are fixed (``derandomize``: the same cases on every run) and
printed; ``EXAMPLES`` below is the total.
"""

from __future__ import annotations

import collections
import json
import string
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_helpers import FakeBackend, RunningRouter, build_tokenizer, words

from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.tokenize import PromptTokenizer

MODEL = "tiny"
KEY, ADMIN = "fuzz-user-key", "fuzz-admin-key"
BODIES, RAW, ADMIN_BODIES = 1500, 600, 300
EXAMPLES = BODIES + RAW + ADMIN_BODIES

_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
ran: dict[str, int] = {"bodies": 0, "raw": 0, "admin": 0}
statuses: collections.Counter[int] = collections.Counter()


class Target(tuple):
    """(router, producer, consumer, client), with a short repr for Hypothesis' failure reports."""

    def __repr__(self) -> str:
        return "<router under fuzz>"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tok = PromptTokenizer(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))
    p = FakeBackend("prefill").start()
    d = FakeBackend("both").start()
    cfg = RouterConfig.model_validate(
        {
            "model": MODEL,
            "tokenizer": "/unused",
            "block_size": 4,
            "clusters": [
                {"name": "remote", "kind": "prfaas", "prefill": [{"url": p.url}]},
                {"name": "local", "kind": "local", "both": [{"url": d.url, "kv_endpoint": "127.0.0.1:15600"}]},
            ],
            "threshold": {"mode": "fixed", "tokens": 40},
            "bandwidth_mode": "scarce",
            "max_body_bytes": 64 << 10,
            "auth": {"api_keys": {"keys": [KEY]}, "admin_keys": {"keys": [ADMIN]}},
        }
    )
    r = RunningRouter(cfg, tok)
    client = httpx.Client(base_url=r.url, timeout=20)
    yield Target((r, p, d, client))
    client.close()
    r.stop()
    p.stop()
    d.stop()


# -- strategies ---------------------------------------------------------------------------------------
leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
any_json = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
count = st.integers(min_value=1, max_value=4)
prompt = st.one_of(
    st.integers(min_value=1, max_value=90).map(lambda n: words(n)),  # short (local) and long (remote)
    st.integers(min_value=41, max_value=90).map(lambda n: words(n, start=n)),
    st.lists(st.integers(min_value=0, max_value=2**40), max_size=60),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5),
    st.lists(st.text(max_size=8), max_size=3),
    st.text(max_size=40),
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant"]) | any_json,
        "content": prompt
        | any_json
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})),
        "name": any_json,
    },
)
#: Options clients send, well-typed (values still odd: NaN temperatures, huge seeds)...
options = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": count,
    "max_tokens": count,
    "max_completion_tokens": count,
    "min_tokens": count,
    "logprobs": st.booleans() | count,
    "top_logprobs": count,
    "prompt_logprobs": count | st.none(),
    "echo": st.booleans(),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "seed": st.integers(),
    "temperature": st.floats(allow_nan=True),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": any_json}), max_size=2),
    "user": st.text(max_size=10),
}
#: ... and with any JSON at all, plus fields the router owns or reads.
ill_typed = {
    **{k: any_json for k in options},
    "chat_template_kwargs": any_json,
    "add_generation_prompt": any_json,
    "kv_transfer_params": any_json,
}
completion_body = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": prompt}, optional=options
) | st.fixed_dictionaries({"model": st.just(MODEL) | any_json, "prompt": prompt | any_json}, optional=ill_typed)
chat_body = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.lists(message, min_size=1, max_size=3)}, optional=options
) | st.fixed_dictionaries(
    {"model": st.just(MODEL) | any_json, "messages": st.lists(message, max_size=3) | any_json}, optional=ill_typed
)
header_text = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=40).map(
    str.strip
)
headers = st.fixed_dictionaries(
    {"authorization": st.sampled_from([f"Bearer {KEY}"] * 12 + [f"Bearer {ADMIN}", "Bearer", "", KEY, "x"])},
    optional={
        "content-type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
        | header_text,
        "x-request-id": header_text,
        "x-authorization": header_text,
        "accept": header_text,
    },
)
endpoint = st.sampled_from(["/v1/completions", "/v1/chat/completions"])


def _mangle(body: bytes, cut: int, insert: bytes) -> bytes:
    at = cut % (len(body) + 1)
    return body[:at] + insert + body[at:]


raw_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        _mangle,
        st.just(json.dumps({"model": MODEL, "prompt": words(50), "max_tokens": 4}).encode()),
        st.integers(min_value=0),
        st.sampled_from(
            [b"\\udcff", b"\\ud800", b"\\u0000", b"\xff", b"\xc3", b"\x00", b"[" * 3000, b'"', b"\\", b"NaN", b"}"]
        ),
    ),
    st.integers(min_value=60, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=60, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


def _check(resp: httpx.Response) -> None:
    statuses[resp.status_code] += 1
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400 and resp.status_code != 499:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["code"] == resp.status_code


# -- properties --------------------------------------------------------------------------------------
@settings(max_examples=BODIES, **_SETTINGS)
@given(path=endpoint, completion=completion_body, chat=chat_body, hdrs=headers)
def test_generated_bodies_and_headers_never_get_a_5xx(target, path, completion, chat, hdrs) -> None:
    r, p, d, client = target
    ran["bodies"] += 1
    body = chat if path.endswith("chat/completions") else completion
    content = json.dumps(body).encode()  # NaN and Infinity as Python writes them: the router must cope
    _check(client.post(path, content=content, headers=hdrs))


@settings(max_examples=RAW, **_SETTINGS)
@given(path=endpoint, raw=raw_bytes)
def test_generated_raw_bytes_never_get_a_5xx(target, path, raw) -> None:
    r, p, d, client = target
    ran["raw"] += 1
    _check(client.post(path, content=raw, headers={"authorization": f"Bearer {KEY}"}))


@settings(max_examples=ADMIN_BODIES, **_SETTINGS)
@given(value=any_json, raw=st.none() | raw_bytes)
def test_generated_threshold_updates_never_break_health(target, value, raw) -> None:
    r, p, d, client = target
    ran["admin"] += 1
    before = r.router.controller.t
    content = raw if raw is not None else json.dumps({"threshold_tokens": value}).encode()
    resp = client.put("/admin/threshold", content=content, headers={"authorization": f"Bearer {ADMIN}"})
    _check(resp)
    health = client.get("/health")
    assert health.status_code == 200, health.text
    if resp.status_code != 200:
        assert r.router.controller.t == before
    r.router.controller.set_fixed(40)


def test_after_the_fuzzing_the_router_is_healthy_and_holds_nothing(target) -> None:
    r, p, d, client = target
    print(f"\nfuzz cases run: {ran} ({sum(ran.values())} in all); answers by status: {dict(sorted(statuses.items()))}")
    assert statuses[200] > 100  # the generators reach the engines too, not only the validation
    assert sum(ran.values()) >= EXAMPLES * 0.9, ran  # Hypothesis ran (nearly) every case it was asked for
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        any(i.inflight for i in r.router.fleet.instances) or p.open_requests or d.open_requests or r.router._serving
    ):
        time.sleep(0.05)
    assert [i.inflight for i in r.router.fleet.instances] == [0, 0]
    assert (p.open_requests, d.open_requests, r.router._serving) == (0, 0, 0)
    assert all(rec.transfer_status for rec in r.router.records.last(10_000) if rec.route == "prfaas")
    assert client.get("/health").status_code == 200
    resp = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": words(60)}, headers={"authorization": f"Bearer {KEY}"}
    )
    assert resp.status_code == 200
