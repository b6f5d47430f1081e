"""The router as an endpoint a platform team can expose (issue #24): bearer-key authentication
with a separate admin credential, the engines' own key, client mistakes answered as 4xx (never
as a router or upstream failure), a body limit enforced before parsing, router faults as 500
with the request id, and the OpenAI options the router passes through (``n`` on both routes).

The router is real (uvicorn on loopback); its neighbours, the engines, are fakes."""

from __future__ import annotations

import itertools

import httpx
import pytest
from router_helpers import FakeBackend, RunningRouter, build_tokenizer, words

from prfaas_plugin.faults.matrix import until
from prfaas_plugin.router.auth import Auth
from prfaas_plugin.router.config import AuthSpec, RouterConfig, RouterConfigError, load_router_config
from prfaas_plugin.router.tokenize import PromptTokenizer

MODEL = "tiny"
USER, ADMIN, ENGINE = "user-key-1", "admin-key-1", "engine-key-1"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PromptTokenizer:
    return PromptTokenizer(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def _cfg(p: FakeBackend, d: FakeBackend, **kw) -> RouterConfig:
    raw = {
        "model": MODEL,
        "tokenizer": "/unused",
        "block_size": 4,
        "clusters": [
            {"name": "remote", "kind": "prfaas", "prefill": [{"url": p.url}]},
            {"name": "local", "kind": "local", "both": [{"url": d.url, "kv_endpoint": "127.0.0.1:15600"}]},
        ],
        "threshold": {"mode": "fixed", "tokens": 40},
        "bandwidth_mode": "scarce",
        "timeouts": {"health_every_s": 0.3, "prefill_s": 10},
        **kw,
    }
    return RouterConfig.model_validate(raw)


@pytest.fixture(scope="module")
def secured(tokenizer):
    p = FakeBackend("prefill").start()
    d = FakeBackend("both").start()
    auth = {
        "api_keys": {"keys": [USER, "user-key-2"]},
        "admin_keys": {"keys": [ADMIN]},
        "upstream_api_key": {"keys": [ENGINE]},
    }
    r = RunningRouter(_cfg(p, d, auth=auth, max_body_bytes=1 << 20), tokenizer)
    yield r, p, d
    r.stop()
    p.stop()
    d.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


_fresh = itertools.count(1)


def _prompt(n_words: int) -> str:
    """A prompt no earlier request began with (a cached prefix would move it to the local route)."""
    return words(n_words, start=next(_fresh) * 7)


def _completion(n_words: int, **kw) -> dict:
    return {"model": MODEL, "prompt": _prompt(n_words), "max_tokens": 8, **kw}


# -- authentication ---------------------------------------------------------------------------------
def test_keys_gate_the_openai_routes_and_admin_needs_the_admin_key(secured) -> None:
    r, p, d = secured
    url = r.url
    for path in ("/v1/completions", "/v1/chat/completions"):
        resp = httpx.post(url + path, json=_completion(5), timeout=10)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert (
        httpx.post(url + "/v1/completions", json=_completion(5), headers=_bearer("wrong"), timeout=10).status_code
        == 401
    )
    assert (
        httpx.post(
            url + "/v1/completions", json=_completion(5), headers={"Authorization": USER}, timeout=10
        ).status_code
        == 401
    )
    for key in (USER, "user-key-2", ADMIN):  # several user keys; the admin key works here too
        resp = httpx.post(url + "/v1/completions", json=_completion(5), headers=_bearer(key), timeout=10)
        assert resp.status_code == 200, resp.text
    assert httpx.get(url + "/v1/models", headers=_bearer(USER), timeout=10).status_code == 200

    for method, path, body in (
        ("GET", "/admin/threshold", None),
        ("PUT", "/admin/threshold", {"threshold_tokens": 0}),
        ("GET", "/admin/requests", None),
        ("GET", "/admin/split", None),
    ):
        assert httpx.request(method, url + path, json=body, timeout=10).status_code == 401
        resp = httpx.request(method, url + path, json=body, headers=_bearer(USER), timeout=10)
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error"]["type"] == "permission_error"
    assert r.router.controller.t == 40  # the refused PUT changed nothing
    resp = httpx.get(url + "/admin/requests", headers=_bearer(ADMIN), timeout=10)
    assert resp.status_code == 200 and resp.json()["requests"]
    # /health and /metrics stay open by default (load balancers and Prometheus probe them).
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert httpx.get(url + "/metrics", timeout=10).status_code == 200


def test_the_engines_get_the_routers_own_key_never_the_clients(secured) -> None:
    r, p, d = secured
    p.seen.clear()
    d.seen.clear()
    resp = httpx.post(r.url + "/v1/completions", json=_completion(60), headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "prfaas"
    d.wait_seen(1)
    p.wait_seen(1)
    for seen in (p.seen[0], d.seen[0]):
        assert seen.headers["authorization"] == f"Bearer {ENGINE}"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"threshold_tokens": NaN}',
        b'{"threshold_tokens": Infinity}',
        b'{"threshold_tokens": -Infinity}',
        b'{"threshold_tokens": -1}',
        b'{"threshold_tokens": 1e300}',
        b'{"threshold_tokens": "100"}',
        b'{"threshold_tokens": true}',
        b'{"threshold_tokens": null}',
        b'{"threshold": 100}',
        b"[100]",
        b"not json",
        b'{"threshold_tokens": "\\udcff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_admin_inputs_are_validated_and_health_survives_them(secured, raw) -> None:
    r, p, d = secured
    before = r.router.controller.t
    resp = httpx.put(r.url + "/admin/threshold", content=raw, headers=_bearer(ADMIN), timeout=10)
    assert resp.status_code == 400, resp.text
    assert "threshold_tokens" in resp.json()["error"]["message"]
    assert r.router.controller.t == before
    health = httpx.get(r.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["threshold_tokens"] == before


def test_a_valid_threshold_is_applied(secured) -> None:
    r, p, d = secured
    try:
        resp = httpx.put(r.url + "/admin/threshold", json={"threshold_tokens": 64}, headers=_bearer(ADMIN), timeout=10)
        assert resp.status_code == 200 and r.router.controller.t == 64
    finally:
        r.router.controller.set_fixed(40)


def test_keys_come_from_a_file_and_an_environment_variable(tmp_path, monkeypatch) -> None:
    (tmp_path / "keys.txt").write_text("# user keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("PRFAAS_TEST_KEYS", "env-key-1, env-key-2")
    monkeypatch.setenv("PRFAAS_TEST_ENGINE_KEY", "engine")
    spec = AuthSpec.model_validate(
        {
            "api_keys": {"keys": ["cfg-key"], "file": str(tmp_path / "keys.txt"), "env": "PRFAAS_TEST_KEYS"},
            "admin_keys": {"env": "PRFAAS_TEST_KEYS"},
            "upstream_api_key": {"env": "PRFAAS_TEST_ENGINE_KEY"},
        }
    )
    auth = Auth(spec)
    assert auth.user == (b"cfg-key", b"file-key-1", b"file-key-2", b"env-key-1", b"env-key-2")
    assert auth.upstream_key == "engine"

    def scope(path: str, key: str | None) -> dict:
        headers = [] if key is None else [(b"authorization", f"Bearer {key}".encode())]
        return {"path": path, "headers": headers, "client": ("127.0.0.1", 5)}

    for key in ("cfg-key", "file-key-2", "env-key-1"):
        assert auth.check(scope("/v1/completions", key)) is None
    assert auth.check(scope("/v1/completions", "file-key-3")).status == 401
    assert auth.check(scope("/v1/completions", None)).status == 401
    # Paths that only look like admin ones are not admin paths.
    assert auth.check(scope("/administrator", "cfg-key")) is None


@pytest.mark.parametrize(
    "auth, message",
    [
        ({"api_keys": {"env": "PRFAAS_TEST_UNSET"}}, "PRFAAS_TEST_UNSET is unset"),
        ({"api_keys": {"file": "/nonexistent/keys"}}, "cannot read"),
        ({"api_keys": {"keys": ["has space"]}}, "printable ASCII"),
        ({"upstream_api_key": {"keys": ["a", "b"]}}, "exactly one key"),
    ],
)
def test_key_sources_that_cannot_work_are_refused_at_start(auth, message, monkeypatch) -> None:
    monkeypatch.delenv("PRFAAS_TEST_UNSET", raising=False)
    with pytest.raises(RouterConfigError, match=message):
        Auth(AuthSpec.model_validate(auth))


def test_protecting_health_needs_keys_and_a_key_file_is_relative_to_the_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="protect_health"):
        AuthSpec.model_validate({"protect_health": True})
    (tmp_path / "keys").write_text("k1\n")
    (tmp_path / "router.yaml").write_text(
        "model: m\ntokenizer: tok\nclusters:\n  - {name: l, kind: local, both: [{url: 'http://h:1', kv_endpoint: 'h:2'}]}\n"
        "auth:\n  api_keys: {file: keys}\n  protect_health: true\n"
    )
    cfg = load_router_config(tmp_path / "router.yaml")
    auth = Auth(cfg.auth)
    assert auth.user == (b"k1",)
    assert auth.check({"path": "/health", "headers": [], "client": ("127.0.0.1", 1)}).status == 401
    assert auth.check({"path": "/metrics", "headers": [], "client": ("127.0.0.1", 1)}) is None


def test_without_admin_keys_admin_answers_loopback_clients_only() -> None:
    auth = Auth(AuthSpec())

    def scope(client: tuple[str, int] | None) -> dict:
        return {"path": "/admin/threshold", "headers": [], "client": client}

    assert auth.check(scope(("127.0.0.1", 1))) is None
    assert auth.check(scope(("::1", 1))) is None
    for client in (("10.1.2.3", 1), ("2001:db8::1", 1), None, ("not-an-ip", 1)):
        refused = auth.check(scope(client))
        assert refused is not None and refused.status == 403, client
    # With no keys at all, the OpenAI endpoints are open, as vLLM's are without --api-key.
    assert auth.check({"path": "/v1/completions", "headers": [], "client": ("10.1.2.3", 1)}) is None


# -- client mistakes are 4xx, router faults 500 -------------------------------------------------------
@pytest.mark.parametrize(
    "raw, status, text",
    [
        (b'{"model": "tiny", "prompt": "\\udcff"}', 400, "surrogate"),
        (b'{"model": "tiny", "prompt": "w1", "user": "\\ud800x"}', 400, "surrogate"),
        (b"[" * 5000 + b"]" * 5000, 400, "nests"),
        (b'{"model": "tiny", "prompt": "w1", "x": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nests"),
        (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not valid JSON"),
        (b'{"model": 5, "prompt": "w1"}', 400, "'model'"),
        (b'{"model": "tiny", "prompt": "w1", "n": "2"}', 400, "'n'"),
        (b'{"model": "tiny", "prompt": {"a": 1}}', 400, "prompt must be"),
        (b'{"model": "gpt-4", "prompt": "w1"}', 404, "does not exist"),
    ],
)
def test_client_mistakes_are_4xx_in_the_openai_shape(secured, raw, status, text) -> None:
    r, p, d = secured
    resp = httpx.post(r.url + "/v1/completions", content=raw, headers=_bearer(USER), timeout=10)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert text in err["message"] and err["code"] == status


def test_an_astral_character_as_a_surrogate_pair_is_fine(secured) -> None:
    r, p, d = secured
    raw = b'{"model": "tiny", "prompt": "w1 w2", "user": "\\ud83d\\ude00"}'
    assert httpx.post(r.url + "/v1/completions", content=raw, headers=_bearer(USER), timeout=10).status_code == 200


def test_an_oversized_body_gets_413_without_being_parsed(secured, monkeypatch) -> None:
    import prfaas_plugin.router.service as service

    r, p, d = secured
    parsed: list[int] = []
    real = service.parse_body
    monkeypatch.setattr(service, "parse_body", lambda raw: parsed.append(len(raw)) or real(raw))
    big = b'{"model": "tiny", "prompt": "' + b"w1 " * (20_000_000 // 3) + b'"}'  # 20 MB
    resp = httpx.post(r.url + "/v1/completions", content=big, headers=_bearer(USER), timeout=30)
    assert resp.status_code == 413, resp.text[:200]
    assert "max_body_bytes" in resp.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(40):
            yield b"w1 " * (1 << 16)

    resp = httpx.post(r.url + "/v1/completions", content=chunks(), headers=_bearer(USER), timeout=30)
    assert resp.status_code == 413
    assert parsed == []
    # Under the limit the same path parses and answers.
    resp = httpx.post(r.url + "/v1/completions", json=_completion(5), headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200 and parsed


def test_the_default_body_limit_follows_max_prompt_tokens() -> None:
    p, d = FakeBackend("prefill"), FakeBackend("both")
    assert _cfg(p, d).body_limit < 20_000_000  # a 20 MB body is refused by default
    assert _cfg(p, d, max_prompt_tokens=1 << 21).body_limit > 32 << 20
    assert _cfg(p, d, max_body_bytes=1000).body_limit == 1000


def test_a_router_fault_is_500_with_the_request_id_in_body_and_log(secured, monkeypatch, caplog) -> None:
    r, p, d = secured

    async def broken(*args, **kw):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(r.router.flow, "run", broken)
    resp = httpx.post(
        r.url + "/v1/completions", json=_completion(5), headers={**_bearer(USER), "x-request-id": "rid-42"}, timeout=10
    )
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["request_id"] == "rid-42" and "ZeroDivisionError" in err["message"]
    assert any("request_id=rid-42" in rec.getMessage() for rec in caplog.records)


def test_unknown_paths_and_bad_admin_queries_answer_in_the_openai_shape(secured) -> None:
    r, p, d = secured
    resp = httpx.get(r.url + "/v1/nothing", headers=_bearer(USER), timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == 404
    resp = httpx.get(r.url + "/admin/requests?limit=abc", headers=_bearer(ADMIN), timeout=10)
    assert resp.status_code == 400 and "limit" in resp.json()["error"]["message"]
    resp = httpx.get(r.url + "/admin/requests?limit=-5", headers=_bearer(ADMIN), timeout=10)
    assert resp.status_code == 400


# -- options passed through ---------------------------------------------------------------------------
def test_tokenize_detokenize_and_version_reach_a_healthy_instance(secured) -> None:
    r, p, d = secured
    assert httpx.post(r.url + "/tokenize", json={"prompt": "a b"}, timeout=10).status_code == 401
    resp = httpx.post(r.url + "/tokenize", json={"model": MODEL, "prompt": "a b c"}, headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200 and resp.json() == {"count": 3, "tokens": [], "served_by": d.url}
    assert d.seen[-1].headers["authorization"] == f"Bearer {ENGINE}"
    resp = httpx.get(r.url + "/version", headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200 and resp.json()["served_by"] == d.url
    resp = httpx.post(r.url + "/tokenize", json={"model": "x", "prompt": "a"}, headers=_bearer(USER), timeout=10)
    assert resp.status_code == 404
    assert httpx.get(r.url + "/tokenize", headers=_bearer(USER), timeout=10).status_code == 405
    # The fake has no /detokenize: the engine's own 404 comes back as it is.
    resp = httpx.post(r.url + "/detokenize", json={"tokens": [1]}, headers=_bearer(USER), timeout=10)
    assert resp.status_code == 404


@pytest.mark.parametrize("chat", [False, True])
def test_n_2_answers_two_choices_on_both_routes(secured, chat) -> None:
    r, p, d = secured
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def body(n_words: int) -> dict:
        if chat:
            return {
                "model": MODEL,
                "messages": [{"role": "user", "content": _prompt(n_words)}],
                "n": 2,
                "max_tokens": 8,
            }
        return _completion(n_words, n=2, logprobs=2, min_tokens=2)

    # Local: the request passes through unchanged; the instance samples twice.
    d.seen.clear()
    short, long = body(5), body(60)
    resp = httpx.post(r.url + path, json=short, headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "local"
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1]
    assert d.seen[-1].body["n"] == 2

    # Remote: one prefill (n=1, one token) pushed to the decode instance as a one-token request,
    # then the client's request there, which finds the prompt cached and fans out.
    p.seen.clear()
    d.seen.clear()
    resp = httpx.post(r.url + path, json=long, headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-prfaas-route"] == "prfaas" and resp.headers["x-prfaas-fan-out"] == "after-prefill"
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1]
    (prod,) = p.wait_seen(1)
    assert "n" not in prod.body and prod.body["max_tokens"] == 1 and "logprobs" not in prod.body
    assert "min_tokens" not in prod.body
    warm, final = d.seen
    assert warm.body["kv_transfer_params"]["role"] == "consumer" and warm.body["max_tokens"] == 1
    assert "n" not in warm.body
    assert final.body == long  # the client's own request, no transfer
    # the leases are released as the answer's last bytes go out, which the client may see first
    assert until(lambda: all(i.inflight == 0 for i in r.router.fleet.instances), 5), [
        i.inflight for i in r.router.fleet.instances
    ]


def test_answer_only_options_stay_off_the_producer_and_prompt_logprobs_prefill_locally(secured) -> None:
    r, p, d = secured
    p.seen.clear()
    d.seen.clear()
    opts = {
        "logprobs": 3,
        "stop": ["w9"],
        "seed": 7,
        "response_format": {"type": "json_object"},
        "stream_options": {"include_usage": True},
        "stream": True,
    }
    resp = httpx.post(r.url + "/v1/completions", json=_completion(60, **opts), headers=_bearer(USER), timeout=10)
    assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "prfaas"
    (prod,) = p.wait_seen(1)
    assert prod.body["stop"] == ["w9"] and prod.body["seed"] == 7  # harmless: kept
    for dropped in ("logprobs", "response_format", "stream_options"):
        assert dropped not in prod.body
    assert prod.body["stream"] is False
    (cons,) = d.wait_seen(1)
    assert {k: cons.body[k] for k in opts} == opts  # the consumer answers: it gets them all

    p.seen.clear()
    for extra in ({"prompt_logprobs": 1}, {"echo": True, "logprobs": 1}):
        resp = httpx.post(r.url + "/v1/completions", json=_completion(60, **extra), headers=_bearer(USER), timeout=10)
        assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "local"
    assert p.seen == []
    recs = {rec.reason for rec in r.router.records.last(2)}
    assert recs == {"prompt logprobs"}
