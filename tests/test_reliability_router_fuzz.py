"""Issue 8, router input: generated hostile and malformed requests always get a 2xx or a 4xx with
a message -- never a 5xx, never a crash -- and the router keeps serving afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_helpers import FakeBackend, words
from test_router import MODEL, RunningRouter, _cfg

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "temperature",
        "kv_transfer_params",
        "stream_options",
        "chat_template_kwargs",
        "extra",
    ]
)
_bodies = st.one_of(
    st.dictionaries(_keys, _values, max_size=6),
    st.dictionaries(_keys, _values, max_size=6).map(lambda d: {"model": MODEL, **d}),
    st.builds(
        lambda n, s, mt: {"model": MODEL, "prompt": words(n), "stream": s, "max_tokens": mt},
        st.integers(0, 300),
        st.booleans(),
        st.one_of(st.integers(-3, 50), st.text(max_size=3)),
    ),
    st.builds(
        lambda c, kv: {"model": MODEL, "messages": [{"role": "user", "content": c}], "kv_transfer_params": kv},
        st.text(max_size=50),
        _values,
    ),
    st.builds(lambda m: {"model": MODEL, "messages": m}, _values),
)


@pytest.fixture(scope="module")
def live(tiny_tokenizer):
    tok = tiny_tokenizer
    p = FakeBackend("prefill").start()
    d = FakeBackend("both").start()
    r = RunningRouter(_cfg(p, d, max_prompt_tokens=250), tok)
    client = httpx.Client(base_url=r.url, timeout=30)
    yield r, client
    client.close()
    r.stop()
    p.stop()
    d.stop()


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        msg = resp.json()["error"]["message"]
        assert isinstance(msg, str) and msg


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=_bodies, chat=st.booleans())
def test_generated_json_bodies_never_5xx(live, body, chat) -> None:
    r, client = live
    _check(client.post("/v1/chat/completions" if chat else "/v1/completions", json=body))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_garbage_bytes_never_5xx(live, raw) -> None:
    r, client = live
    _check(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))


def test_oversized_prompt_and_body(live) -> None:
    r, client = live
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": words(251)})
    assert resp.status_code == 400 and "over the limit" in resp.json()["error"]["message"]
    big = json.dumps({"model": MODEL, "prompt": "w1 " * (23 << 20)}).encode()
    resp = client.post("/v1/completions", content=big)
    assert resp.status_code == 413


def test_slow_loris_client_does_not_block_others(live) -> None:
    import socket
    import time

    r, client = live
    host, port = "127.0.0.1", r.port
    s = socket.create_connection((host, port))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    try:
        t0 = time.monotonic()
        resp = client.post("/v1/completions", json={"model": MODEL, "prompt": words(5), "max_tokens": 2})
        assert resp.status_code == 200 and time.monotonic() - t0 < 5
    finally:
        s.close()
    assert client.get("/health").status_code == 200
