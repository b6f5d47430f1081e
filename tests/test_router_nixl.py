"""The router's per-hop protocol choice (``ClusterSpec.transfer``): a PD cluster whose prefill
instances hand KV on over vLLM's NixlConnector next to a PrfaaS cluster on the prfaas connector,
against fake engines (its neighbours). The real-vLLM version is tests/test_vllm_nixl.py."""

from __future__ import annotations

import json

import pytest
from router_helpers import FakeBackend, RunningRouter, words

from prfaas_plugin.protocol.requests import parse_params
from prfaas_plugin.router.config import RouterConfig
from prfaas_plugin.router.instances import Fleet, Instance
from prfaas_plugin.router.pd import NixlPD, hop_protocols, pd_protocol

MODEL = "tiny"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def _raw(p: str, d: str, f: str | None = "http://f:1", transfer: str = "nixl", engine: str = "vllm", **kw) -> dict:
    clusters: list[dict] = [
        {
            "name": "pd",
            "kind": "local",
            "transfer": transfer,
            "prefill": [{"url": p}],
            "decode": [{"url": d, "kv_endpoint": "127.0.0.1:15600"}],
        }
    ]
    if f is not None:
        clusters.insert(0, {"name": "remote", "kind": "prfaas", "prefill": [{"url": f}]})
    return {
        "model": MODEL,
        "engine": engine,
        "tokenizer": "/unused",
        "block_size": 4,
        "clusters": clusters,
        "threshold": {"mode": "fixed", "tokens": 40},
        "bandwidth_mode": "scarce",
        "timeouts": {"health_every_s": 0.3, "prefill_s": 10},
        **kw,
    }


# -- config ------------------------------------------------------------------------------------------


def test_transfer_is_per_cluster_and_reaches_the_instances() -> None:
    cfg = RouterConfig.model_validate(_raw("http://p:1", "http://d:1"))
    by_url = {i.url: i for i in Fleet.from_config(cfg).instances}
    assert by_url["http://p:1"].transfer == "nixl"
    assert by_url["http://f:1"].transfer == "prfaas"  # the default: the prfaas connector


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r["clusters"][1].update(transfer="mooncake"), "transfer"),
        (lambda r: r["clusters"][0].update(transfer="nixl"), "prfaas cluster's KV crosses datacenters"),
        (lambda r: r.update(engine="sglang"), "needs engine: vllm"),
        (
            lambda r: r["clusters"][1].update(prefill=[], both=[{"url": "http://b:1", "kv_endpoint": "b:2"}]),
            "has none",
        ),
        (lambda r: r["clusters"][1].update(nixl_port=5600), "nixl_port"),
    ],
    ids=["unknown-protocol", "nixl-across-datacenters", "nixl-with-sglang", "nixl-without-prefill", "unknown-key"],
)
def test_bad_transfer_choices_are_refused_naming_the_field(change, match) -> None:
    raw = _raw("http://p:1", "http://d:1")
    change(raw)
    with pytest.raises(ValueError, match=match):
        RouterConfig.model_validate(raw)


def test_kv_endpoint_is_needed_only_where_a_prfaas_hand_off_can_land() -> None:
    raw = _raw("http://p:1", "http://d:1", f=None)
    del raw["clusters"][0]["decode"][0]["kv_endpoint"]
    RouterConfig.model_validate(raw)  # every hand-off goes over NIXL: no prfaas receiver to name
    raw = _raw("http://p:1", "http://d:1")
    del raw["clusters"][1]["decode"][0]["kv_endpoint"]
    with pytest.raises(ValueError, match="needs kv_endpoint"):
        RouterConfig.model_validate(raw)  # the PrfaaS cluster pushes to it


# -- the NIXL strategy ---------------------------------------------------------------------------------


def _inst(role: str) -> Instance:
    return Instance("http://10.0.0.1:8000", "pd", "local", role, transfer="nixl")  # type: ignore[arg-type]


def test_nixl_strategy_asks_the_producer_for_a_remote_decode_and_hands_its_answer_on() -> None:
    hops = hop_protocols(pd_protocol("vllm", 12.0))
    pd = hops["nixl"]
    assert isinstance(pd, NixlPD) and pd.sequential and not hops["prfaas"].sequential
    body = {"model": "m", "prompt": "x", "n": 2, "max_tokens": 9, "stream": True, "stream_options": {}}
    prod, cons, tid = pd.bodies(body, _inst("prefill"), _inst("decode"))
    assert prod["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert prod["max_tokens"] == 1 and prod["stream"] is False and "n" not in prod and "stream_options" not in prod
    assert cons == body and tid == ""
    answer = {"kv_transfer_params": {"do_remote_prefill": True, "tp_size": 1, **{k: 1 for k in NixlPD.HANDOFF_FIELDS}}}
    handoff = pd.handoff(answer)
    assert pd.consumer_body(cons, handoff)["kv_transfer_params"] == answer["kv_transfer_params"]
    assert set(hop_protocols(pd_protocol("sglang", 1.0))) == {"prfaas"}


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ({}, "no kv_transfer_params"),
        ({"kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "e"}}, "lack remote_request_id"),
        (
            {"kv_transfer_params": {"do_remote_prefill": False, **{k: 1 for k in NixlPD.HANDOFF_FIELDS}}},
            "remote prefill",
        ),
    ],
)
def test_a_producer_answer_without_a_nixl_hand_off_is_refused(answer, match) -> None:
    with pytest.raises(ValueError, match=match):
        NixlPD(1.0).handoff(answer)


# -- the router, end to end against fakes --------------------------------------------------------------


@pytest.fixture
def mixed(tokenizer):
    p = FakeBackend("prefill", prefill_delay_s=0.2).start()
    d = FakeBackend("decode").start()
    f = FakeBackend("prefill", prefill_delay_s=0.2).start()
    r = RunningRouter(RouterConfig.model_validate(_raw(p.url, d.url, f.url)), tokenizer)
    yield r, p, d, f
    r.stop()
    for b in (p, d, f):
        b.stop()


def _completion(n_words: int, start: int = 0, **kw) -> dict:
    return {"model": MODEL, "prompt": words(n_words, start), "max_tokens": 8, **kw}


def test_short_requests_go_over_nixl_and_long_ones_over_prfaas(mixed) -> None:
    r, p, d, f = mixed
    short = r.post("/v1/completions", _completion(10))
    assert short.status_code == 200, short.text
    assert short.headers["x-prfaas-route"] == "local" and "x-prfaas-fallback" not in short.headers
    (pb,) = [s.body for s in p.seen]
    assert pb["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert pb["max_tokens"] == 1
    (dseen,) = d.wait_seen(1)
    kvp = dseen.body["kv_transfer_params"]
    assert kvp["do_remote_prefill"] is True and kvp["remote_engine_id"] == f"engine-{p.port}"
    assert dseen.body["prompt"] == pb["prompt"] and dseen.body["max_tokens"] == 8
    assert p.seen[0].finished_at is not None and dseen.at >= p.seen[0].finished_at  # one after the other
    assert not f.seen

    long = r.post("/v1/completions", _completion(120, start=500))
    assert long.status_code == 200, long.text
    assert long.headers["x-prfaas-route"] == "prfaas"
    (fb,) = [s.body for s in f.wait_seen(1)]
    fp, dp = parse_params(fb["kv_transfer_params"]), parse_params(d.wait_seen(2)[1].body["kv_transfer_params"])
    assert fp is not None and dp is not None and fp.transfer_id == dp.transfer_id
    assert fp.role == "producer" and dp.role == "consumer" and fp.decode_endpoint == "127.0.0.1:15600"
    assert len(p.seen) == 1  # the long one never touched the NIXL producer

    recs = r.get("/admin/requests").json()
    by_route = {x["route"]: x for x in recs["requests"]}
    assert by_route["local"]["transfer_id"] == kvp["remote_request_id"]
    assert by_route["prfaas"]["transfer_id"] == fp.transfer_id


def test_a_streamed_nixl_request_relays_the_decode_stream(mixed) -> None:
    r, p, d, _ = mixed
    resp = r.post("/v1/completions", _completion(12, stream=True))
    assert resp.status_code == 200
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == d.text_for(d.seen[-1].body)
    assert p.seen[0].body["stream"] is False and d.seen[-1].body["stream"] is True


def test_a_producer_without_nixl_falls_back_to_decode_prefilling_alone(mixed) -> None:
    r, p, d, _ = mixed
    p.nixl = False
    resp = r.post("/v1/completions", _completion(10, start=50))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-prfaas-fallback"] == "local producer failed"
    (dseen,) = d.wait_seen(1)
    assert "kv_transfer_params" not in dseen.body  # the decode instance prefills on its own


def test_a_failed_nixl_producer_falls_back_too(mixed) -> None:
    r, p, d, _ = mixed
    p.status = 500
    resp = r.post("/v1/completions", _completion(10, start=70))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-prfaas-fallback"] == "local producer failed"
    assert "kv_transfer_params" not in d.wait_seen(1)[0].body
