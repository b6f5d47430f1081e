"""The router against fake OpenAI backends (its neighbours): every routing rule, the request
protocol, streaming through the official openai client, the threshold loops and fallbacks."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.responses import JSONResponse, Response, StreamingResponse
from router_helpers import FakeBackend, RunningRouter, build_tokenizer, words

from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.router.config import RouterConfig, RouterConfigError, load_router_config
from prfaas_plugin.router.tokenize import PromptTokenizer

MODEL = "tiny"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer) -> PromptTokenizer:
    return tiny_tokenizer


def _cfg(p: FakeBackend | None, d: FakeBackend, tokenizer_dir: str = "/unused", **kw) -> RouterConfig:
    clusters = [{"name": "local", "kind": "local", "both": [{"url": d.url, "kv_endpoint": "127.0.0.1:15600"}]}]
    if p is not None:
        clusters.insert(0, {"name": "remote", "kind": "prfaas", "prefill": [{"url": p.url}]})
    raw = {
        "model": MODEL,
        "tokenizer": tokenizer_dir,
        "block_size": 4,
        "clusters": clusters,
        "threshold": {"mode": "fixed", "tokens": 40},
        "bandwidth_mode": "scarce",
        "timeouts": {"health_every_s": 0.3, "prefill_s": 10},
    }
    for k, v in kw.items():
        raw[k] = v
    return RouterConfig.model_validate(raw)


@pytest.fixture
def fleet(tokenizer):
    p = FakeBackend("prefill", prefill_delay_s=0.3).start()
    d = FakeBackend("both").start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    yield r, p, d
    r.stop()
    p.stop()
    d.stop()


def _completion(n_words: int, start: int = 0, **kw) -> dict:
    return {"model": MODEL, "prompt": words(n_words, start), "max_tokens": 8, **kw}


# -- routing rules and the request protocol --------------------------------------------------------
def test_short_request_stays_local_unchanged(fleet) -> None:
    r, p, d = fleet
    resp = r.post("/v1/completions", _completion(10))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-prfaas-route"] == "local"
    assert resp.headers["x-prfaas-uncached-tokens"] == "10"
    assert not p.seen
    assert "kv_transfer_params" not in d.seen[-1].body
    assert resp.json()["choices"][0]["text"].startswith("echo[")


def test_long_request_goes_remote_with_concurrent_producer_and_consumer(fleet) -> None:
    r, p, d = fleet
    resp = r.post("/v1/completions", _completion(100))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-prfaas-route"] == "prfaas"
    prod, cons = p.wait_seen()[-1], d.seen[-1]
    pk, ck = prod.body["kv_transfer_params"], cons.body["kv_transfer_params"]
    assert prod.body["max_tokens"] == 1 and prod.body["stream"] is False
    assert pk["role"] == "producer" and ck["role"] == "consumer"
    assert pk["transfer_id"] == ck["transfer_id"] and pk["token"] == ck["token"] and len(pk["token"]) >= 22
    assert pk["decode_endpoint"] == "127.0.0.1:15600"
    assert cons.body["max_tokens"] == 8
    rec = r.router.records[resp.headers["x-request-id"]]
    deadline = time.monotonic() + 5
    while (rec.transfer_status is None or prod.finished_at is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Sent at the same time: the consumer had the request long before the producer finished.
    assert cons.at < prod.finished_at - 0.2
    assert rec.kv_bytes == 100 * 1000 and rec.transfer_status == "sent"


def test_prefix_cache_hit_flips_a_long_request_to_local(fleet) -> None:
    r, p, d = fleet
    base = _completion(100, start=7)
    assert r.post("/v1/completions", base).headers["x-prfaas-route"] == "prfaas"
    time.sleep(0.5)  # the producer's answer records the prefix on both instances
    extended = dict(base, prompt=base["prompt"] + " " + words(12, start=50))
    resp = r.post("/v1/completions", extended)
    assert resp.headers["x-prfaas-route"] == "local"
    assert int(resp.headers["x-prfaas-uncached-tokens"]) <= 16  # 100 cached (block-aligned) + 12 new
    assert r.router.records[resp.headers["x-request-id"]].reason == "local prefix hit"


def test_bandwidth_modes_judge_prefixes_differently(tokenizer) -> None:
    p = FakeBackend("prefill").start()
    d = FakeBackend("both").start()
    try:
        for mode, expect in (("scarce", "prfaas"), ("abundant", "local")):
            r = RunningRouter(_cfg(p, d, bandwidth_mode=mode), tokenizer)
            try:
                prompt = words(96, start=3)
                ids = r.router.tokenizer.completion_tokens(prompt)
                r.router.index.record(p.url, ids)  # only the PrfaaS side holds this prefix
                resp = r.post(
                    "/v1/completions", {"model": MODEL, "prompt": prompt + " " + words(8, 120), "max_tokens": 2}
                )
                assert resp.headers["x-prfaas-route"] == expect, mode
            finally:
                r.stop()
    finally:
        p.stop()
        d.stop()


def test_openai_client_unchanged_streaming_and_not(fleet) -> None:
    import openai

    r, p, d = fleet
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    for n in (10, 100):  # local and remote
        out = client.completions.create(model=MODEL, prompt=words(n, 30), max_tokens=4)
        assert out.choices[0].text.startswith("echo[")
        chunks = list(client.completions.create(model=MODEL, prompt=words(n, 31), max_tokens=4, stream=True))
        assert "".join(c.choices[0].text for c in chunks).startswith("echo[")
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": words(n, 32)}])
        assert chat.choices[0].message.content.startswith("echo[")
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words(n, 33)}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream).startswith("echo[")
    routes = [rec.route for rec in r.router.records.values()]
    assert routes.count("prfaas") == 4 and routes.count("local") == 4


# -- fallbacks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_producer_http_failure_falls_back_to_local_without_client_error(tokenizer, stream) -> None:
    p = FakeBackend("prefill", status=500).start()
    d = FakeBackend("both", decode_delay_s=0.5).start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(100, stream=stream))
        assert resp.status_code == 200
        assert resp.headers.get("x-prfaas-fallback") == "prfaas failed"
        assert "echo" in resp.text and ("[DONE]" in resp.text) == stream
        assert "kv_transfer_params" not in d.seen[-1].body  # re-sent as a plain local request
        assert r.router.records[resp.headers["x-request-id"]].fallback.startswith("prfaas failed")
        assert f'{M.ROUTER_FALLBACKS.exposed}{{reason="prfaas failed"}} 1.0' in httpx.get(r.url + "/metrics").text
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_transfer_reported_failed_falls_back(tokenizer) -> None:
    p = FakeBackend("prefill", transfer_status="failed").start()
    d = FakeBackend("both", decode_delay_s=0.5).start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(100))
        assert resp.status_code == 200 and resp.headers.get("x-prfaas-fallback") == "prfaas failed"
    finally:
        r.stop()
        p.stop()
        d.stop()


@pytest.mark.parametrize("words_n", [10, 100], ids=["local", "remote"])
def test_an_answer_the_engine_ended_itself_is_a_502_not_a_reply(tokenizer, words_n) -> None:
    """vLLM answers 200 with finish_reason "abort" and no text when its engine core dies under a
    request: the router must not hand that to the client as a completion."""
    p = FakeBackend("prefill").start()
    d = FakeBackend("both", finish_reason="abort").start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(words_n))
        assert resp.status_code == 502, resp.text
        err = resp.json()["error"]
        assert "finish_reason 'abort'" in err["message"] and d.url in err["message"]
        assert r.router.records[err["request_id"]].status == 502
        assert re.search(
            rf'{M.ROUTER_REQUESTS.exposed}{{[^}}]*outcome="upstream_error"[^}}]*}} 1.0',
            httpx.get(r.url + "/metrics").text,
        )
        d.finish_reason = "length"
        assert r.post("/v1/completions", _completion(words_n)).status_code == 200
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_prfaas_cluster_down_routes_local(tokenizer) -> None:
    d = FakeBackend("both").start()
    dead = FakeBackend("prefill")  # never started: connection refused
    r = RunningRouter(_cfg(dead, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(100))
        assert resp.status_code == 200
        assert resp.headers["x-prfaas-route"] == "local"
        assert r.router.records[resp.headers["x-request-id"]].reason == "prfaas unavailable"
        health = httpx.get(r.url + "/health").json()
        assert any(not i["healthy"] and i["url"] == dead.url for i in health["instances"])
    finally:
        r.stop()
        d.stop()


def test_an_instance_down_at_startup_takes_traffic_soon_after_it_comes_up(tokenizer) -> None:
    """A router started beside its engines probes at once, and keeps probing an instance that is
    down every ``health_down_every_s``, not every ``health_every_s``: a PrfaaS cluster that came
    up late gets its long requests within a second or so, not a whole interval later."""
    d = FakeBackend("both").start()
    late = FakeBackend("prefill")  # not listening yet
    cfg = _cfg(late, d, timeouts={"health_every_s": 60, "health_down_every_s": 0.2, "prefill_s": 10})
    r = RunningRouter(cfg, tokenizer)
    insts = {i.url: i for i in r.router.fleet.instances}
    try:
        # No request needed to learn it is down: the first probe runs when the router starts.
        assert _eventually(lambda: not insts[late.url].healthy, 5)
        resp = r.post("/v1/completions", _completion(100))
        assert resp.headers["x-prfaas-route"] == "local"
        assert r.router.records[resp.headers["x-request-id"]].reason == "prfaas unavailable"
        late.start()
        # Well inside health_every_s (60 s): the down cadence finds it up.
        assert _eventually(lambda: insts[late.url].healthy, 5)
        resp = r.post("/v1/completions", _completion(100, start=1))
        assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "prfaas"
        # Healthy again, it is back on the long interval: no probe storm against a live engine.
        probed = insts[late.url].probed_at
        time.sleep(0.6)
        assert insts[late.url].probed_at == probed
    finally:
        r.stop()
        if late.thread.is_alive():
            late.stop()
        d.stop()


def test_slow_health_probes_mark_an_instance_down_only_after_several_in_a_row() -> None:
    """A vLLM instance in a long CPU prefill answers /health late; one late answer must not send
    its traffic elsewhere, but an instance that keeps not answering is down."""
    import asyncio

    from prfaas_plugin.router.instances import Fleet, Instance
    from prfaas_plugin.router.upstream import Upstream

    slow = FakeBackend("prefill", health_delay_s=0.5).start()
    dead = FakeBackend("prefill")  # never started: refused
    fleet = Fleet(
        [Instance(slow.url, "remote", "prfaas", "prefill"), Instance(dead.url, "remote", "prfaas", "prefill")]
    )
    s, gone = fleet.instances

    async def probes() -> list[tuple[bool, bool]]:
        client = Upstream(1.0, 5.0)
        await client.start()
        try:
            seen = []
            for delay in (0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.0):
                slow.health_delay_s = delay
                await fleet.check_health(client, 0.2, slow_limit=3)
                seen.append((s.healthy, gone.healthy))
            return seen
        finally:
            await client.close()

    try:
        seen = asyncio.run(probes())
    finally:
        slow.stop()
    # two late probes: still up; an answer resets the count; the third late one in a row: down;
    # one good answer: up again. A refused connection is down from the first probe.
    assert [h for h, _ in seen] == [True, True, True, True, True, False, True]
    assert not any(g for _, g in seen)
    assert "refused" in gone.last_error.lower() or "connect" in gone.last_error.lower(), gone.last_error


def test_requests_arriving_together_spread_over_the_instances(tokenizer) -> None:
    """Remote requests that arrive together are placed on different instances: each holds its
    producer and consumer from the moment it is placed, not from when its upstream requests
    first run, so the next placement already counts it."""
    import asyncio

    ps = [FakeBackend("prefill", prefill_delay_s=1.0).start() for _ in range(2)]
    ds = [FakeBackend("both", decode_delay_s=2.0).start() for _ in range(2)]
    clusters = [
        {"name": "remote", "kind": "prfaas", "prefill": [{"url": p.url} for p in ps]},
        {"name": "local", "kind": "local", "both": [{"url": d.url, "kv_endpoint": "127.0.0.1:15600"} for d in ds]},
    ]
    r = RunningRouter(_cfg(None, ds[0], clusters=clusters), tokenizer)

    async def burst(rnd: int) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            resps = await asyncio.gather(
                *(client.post(r.url + "/v1/completions", json=_completion(60, start=8 * rnd + k)) for k in range(8))
            )
        return [x.status_code for x in resps]

    try:
        for rnd in range(3):  # new prompts each round: nothing cached anywhere
            for e in ps + ds:
                e.seen.clear()
            assert asyncio.run(burst(rnd)) == [200] * 8
            assert [len(p.seen) for p in ps] == [4, 4]
            assert [len(d.seen) for d in ds] == [4, 4]
    finally:
        r.stop()
        for e in ps + ds:
            e.stop()


def test_client_disconnect_aborts_both_sides(tokenizer) -> None:
    p = FakeBackend("prefill", prefill_delay_s=3.0).start()
    d = FakeBackend("both", decode_delay_s=3.0).start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/v1/completions", json=_completion(100), timeout=0.7)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (p.seen and p.seen[-1].aborted):
            time.sleep(0.05)
        assert p.seen[-1].aborted, "the producer request must be cancelled when the client leaves"
        assert d.seen[-1].finished_at is None
        time.sleep(0.3)
        assert all(i.inflight == 0 for i in r.router.fleet.instances)
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_streaming_client_leaving_during_a_remote_prefill_aborts_both_sides(tokenizer) -> None:
    p = FakeBackend("prefill", prefill_delay_s=3.0).start()
    d = FakeBackend("both", decode_delay_s=3.0).start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        with pytest.raises(httpx.ReadTimeout):  # no header yet: the prefill runs remotely
            with httpx.stream(
                "POST", r.url + "/v1/completions", json={**_completion(100), "stream": True}, timeout=0.7
            ) as resp:
                resp.read()
        assert _eventually(lambda: bool(p.seen) and p.seen[-1].aborted, 2), "the producer must be cancelled at once"
        assert _eventually(lambda: all(i.inflight == 0 for i in r.router.fleet.instances), 2)
        assert _eventually(lambda: r.router._serving == 0, 2), "a request that ended must leave the open count"
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_client_leaving_a_stream_aborts_the_upstream_request(tokenizer) -> None:
    p = FakeBackend("prefill").start()
    d = FakeBackend("both", decode_delay_s=3.0).start()
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        t0 = time.monotonic()
        with httpx.stream(
            "POST", r.url + "/v1/completions", json={**_completion(10), "stream": True}, timeout=5
        ) as resp:
            assert resp.status_code == 200  # headers are out; the first token is 3 s away
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (d.seen and d.seen[-1].aborted):
            time.sleep(0.02)
        assert d.seen[-1].aborted, "the engine's request must be aborted when the client leaves its stream"
        assert time.monotonic() - t0 < 2.5, "the abort must not wait for the next token"
        assert _eventually(lambda: all(i.inflight == 0 for i in r.router.fleet.instances), 2)
        assert r.router.records[next(reversed(r.router.records))].error == "client disconnected"
        assert _eventually(lambda: r.router._serving == 0, 2)
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_completion_endpoints_take_only_post(fleet) -> None:
    r = fleet[0]
    got = httpx.get(r.url + "/v1/completions", timeout=5)
    assert got.status_code == 405 and got.headers["allow"] == "POST"
    assert "POST" in got.json()["error"]["message"]


# -- threshold loops ------------------------------------------------------------------------------
def _planner_yaml(tmp_path: Path) -> Path:
    cfg = {
        "workload": {"lognormal": {"mu": 4.0, "sigma": 0.8, "min": 4, "max": 400}, "output_tokens": 8},
        "profiles": {
            "cpu": {
                "lengths": [8, 64, 256, 512],
                "t_prefill_s": [0.01, 0.05, 0.3, 0.9],
                "s_kv_mib": [0.1, 0.5, 2.0, 4.0],
            }
        },
        "deployment": {"prfaas_profile": "cpu", "pd_profile": "cpu", "prfaas_instances": 1, "pd_instances": 2},
        "decode": {"bs_max": 8, "t_decode_s": 0.01},
        "link": {"gbps": 1.0},
        "search": {"threshold_step": 4},
    }
    path = tmp_path / "planner.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _eventually(cond, timeout_s: float) -> bool:
    from prfaas_plugin.faults.matrix import until

    return until(cond, timeout_s)


def test_auto_threshold_follows_planner_rises_under_egress_and_settles(tokenizer, tmp_path) -> None:
    from prfaas_plugin.planner import Empirical, load_config, plan

    p = FakeBackend("prefill", kv_bytes_per_token=2000).start()
    d = FakeBackend("both").start()
    th = {
        "mode": "auto",
        "tokens": 40,
        "planner": str(_planner_yaml(tmp_path)),
        "min_samples": 8,
        "reoptimize_every_s": 0.2,
        "egress_high": 0.8,
        "egress_low": 0.3,
        "egress_window_s": 1.0,
        "step": 0.2,
    }
    r = RunningRouter(_cfg(p, d, threshold=th, link_gbps=0.002), tokenizer)
    try:
        lengths = []
        for i in range(10):
            n = 30 + 7 * i
            lengths.append(n)
            r.post("/v1/completions", _completion(n, start=13 * i))
        time.sleep(0.8)
        ctl = r.router.controller
        cfg, _ = load_config(th["planner"])
        expect = plan(cfg.system(), Empirical.from_samples(lengths), 4).best.threshold
        assert ctl.t_star == pytest.approx(expect)
        # Saturate the (tiny) link: KV reported by producers > 80% of 2 Mbit/s over 1 s.
        t_before = ctl.t
        ctl.record_egress(10_000_000)
        # Polled, not slept: the loop runs every 0.2 s, but a loaded CI host may run it late.
        assert _eventually(lambda: ctl.t > t_before, 10), "t must rise while egress is over the high mark"
        assert any(reason.startswith("raise") for _, _, reason in ctl.timeline)
        raised = max(t for _, t, reason in ctl.timeline if reason.startswith("raise"))
        # the egress window empties: t relaxes back to the planner's optimum
        assert _eventually(lambda: ctl.t < raised and ctl.t == pytest.approx(ctl.t_star), 15), (ctl.t, raised)
        snap = httpx.get(r.url + "/admin/threshold").json()
        assert snap["mode"] == "auto" and snap["timeline"]
        split = httpx.get(r.url + "/admin/split").json()["advice"]
        assert split["n_prefill"] + split["n_decode"] == 2
        assert M.ROUTER_SPLIT.exposed in httpx.get(r.url + "/metrics").text
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_reoptimisation_runs_off_the_event_loop_and_scrapes_do_not_step_t(tokenizer, tmp_path, monkeypatch) -> None:
    """The planner search (a full grid search) runs on a worker thread, not on the thread that
    runs the router's event loop; a /metrics scrape reads the gauges and never steps the loop."""
    import asyncio
    import threading

    import prfaas_plugin.planner as planner_mod

    p = FakeBackend("prefill").start()
    d = FakeBackend("both").start()
    th = {"mode": "auto", "tokens": 40, "planner": str(_planner_yaml(tmp_path)), "min_samples": 1}
    r = RunningRouter(_cfg(p, d, threshold=th), tokenizer)
    try:
        loops, ctl = r.router.loops, r.router.controller
        ran_on: list[threading.Thread] = []
        real_plan = planner_mod.plan

        def recording_plan(*a, **kw):
            ran_on.append(threading.current_thread())
            return real_plan(*a, **kw)

        monkeypatch.setattr(planner_mod, "plan", recording_plan)
        ctl.observe_length(120)
        ctl._last_opt = float("-inf")  # due now
        asyncio.run(loops.threshold_step())
        assert ran_on and ran_on[0] is not threading.current_thread()
        assert not ctl.reoptimise_due()

        def no_step(*_a, **_kw):
            raise AssertionError("a scrape stepped the threshold controller")

        monkeypatch.setattr(ctl, "tick", no_step)
        resp = httpx.get(r.url + "/metrics")
        assert resp.status_code == 200 and M.ROUTER_THRESHOLD.exposed in resp.text
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_hysteresis_does_not_flap() -> None:
    from prfaas_plugin.router.config import ThresholdSpec
    from prfaas_plugin.router.threshold import ThresholdController

    ctl = ThresholdController(ThresholdSpec(mode="fixed", tokens=1000), link_gbps=1.0)
    ctl.spec = ctl.spec.model_copy(update={"mode": "auto", "planner": "x"})  # loops on, no planner
    ctl.reoptimise = lambda now=None: None  # type: ignore[method-assign]
    now = 1000.0
    ctl.record_egress(int(0.9e9 / 8 * 10), now)  # 90% of the link over the 10 s window
    assert ctl.tick(0, now) > 1000
    high = ctl.t
    ctl._egress.clear()
    ctl.record_egress(int(0.7e9 / 8 * 10), now + 1)  # 70%: between the marks -> hold
    for k in range(5):
        assert ctl.tick(0, now + 1 + k * 0.1) == high
    ctl._egress.clear()  # 0%: below the low mark -> relax to t*
    for k in range(50):
        ctl.tick(0, now + 2 + k)
    assert ctl.t == 1000


# -- input validation and admin ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, status, text",
    [
        ("{nope", 400, "not valid JSON"),
        ([1, 2], 400, "JSON object"),
        ({"prompt": "w1"}, 400, "'model'"),
        ({"model": "other", "prompt": "w1"}, 404, "does not exist"),
        ({"model": MODEL}, 400, "'prompt' is required"),
        ({"model": MODEL, "prompt": "w1", "stream": "yes"}, 400, "'stream'"),
        ({"model": MODEL, "prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "w1", "kv_transfer_params": {}}, 400, "set by the router"),
        ({"model": MODEL, "prompt": [[1, 2]]}, 400, "prompt must be"),
        ({"model": MODEL, "prompt": ""}, 400, "empty"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(fleet, body, status, text) -> None:
    r, p, d = fleet
    content = body if isinstance(body, str) else None
    resp = httpx.post(r.url + "/v1/completions", content=content, json=None if content else body, timeout=10)
    assert resp.status_code == status
    assert text in resp.json()["error"]["message"]


def test_metrics_health_and_records(fleet) -> None:
    r, p, d = fleet
    r.post("/v1/completions", _completion(10))
    r.post("/v1/completions", _completion(100, start=40))
    m = httpx.get(r.url + "/metrics").text
    decisions = M.ROUTER_DECISIONS.exposed
    assert f'{decisions}{{reason="uncached length within threshold",route="local"}}' in m
    assert f'{decisions}{{reason="uncached length above threshold",route="prfaas"}}' in m
    assert f"{M.ROUTER_THRESHOLD.name} 40.0" in m
    assert f"{M.ROUTER_TTFT.name}_bucket" in m
    # Garbage collection on the router's clock is on by default (router/gcpace.py).
    young = re.search(M.ROUTER_GC_COLLECTIONS.name + r'\{generation="0"\} (\S+)', m)
    assert young is not None and float(young.group(1)) > 0
    assert r.router._serving == 0  # every answered request left the count (the pacer idles at 0)
    assert httpx.get(r.url + "/health").status_code == 200
    recs = httpx.get(r.url + "/admin/requests").json()["requests"]
    assert {x["route"] for x in recs} == {"local", "prfaas"}


def test_the_gc_pacer_idles_between_requests_and_paces_while_one_is_open(tokenizer) -> None:
    """Through the router itself: no request open, (almost) no collections; one open, the
    10 ms pace again at once (Router.serve wakes the pacer)."""
    d = FakeBackend("both", decode_delay_s=1.5).start()
    r = RunningRouter(_cfg(None, d, gc={"idle_every_s": 60}), tokenizer)
    try:
        pacer = r.router.gc_pacer
        time.sleep(0.3)  # past start-up, idle
        c0 = sum(pacer.collections)
        time.sleep(0.5)
        assert sum(pacer.collections) == c0, "an idle router waits its idle period (60 s here)"
        t = threading.Thread(target=lambda: r.post("/v1/completions", _completion(10)))
        t.start()
        assert _eventually(lambda: r.router._serving == 1, 5)
        c1 = sum(pacer.collections)
        time.sleep(0.4)
        assert sum(pacer.collections) - c1 >= 10, "while a request is open the pacer runs every 10 ms"
        t.join(10)
        assert r.router._serving == 0
    finally:
        r.stop()
        d.stop()


def test_config_errors_are_clear(tmp_path) -> None:
    good = {
        "model": "m",
        "tokenizer": ".",
        "clusters": [
            {"name": "l", "kind": "local", "both": [{"url": "http://127.0.0.1:1", "kv_endpoint": "127.0.0.1:2"}]}
        ],
    }
    cases = [
        (dict(good, surprise=1), "surprise"),
        (dict(good, clusters=[{"name": "l", "kind": "local", "both": [{"url": "http://127.0.0.1:1"}]}]), "kv_endpoint"),
        (
            dict(good, clusters=[{"name": "p", "kind": "prfaas", "prefill": [{"url": "http://127.0.0.1:1"}]}]),
            "local cluster",
        ),
        (dict(good, threshold={"mode": "auto"}), "threshold.planner"),
        (
            dict(good, clusters=[{"name": "l", "kind": "local", "both": [{"url": "ftp://x", "kv_endpoint": "a:1"}]}]),
            "http://",
        ),
        # Values that load but cannot work: each used to surface later (a 500, a dead thread).
        (
            dict(
                good,
                clusters=[{"name": "l", "kind": "local", "both": [{"url": "http://h:port", "kv_endpoint": "a:1"}]}],
            ),
            "port",
        ),
        (
            dict(
                good, clusters=[{"name": "l", "kind": "local", "both": [{"url": "http://:80", "kv_endpoint": "a:1"}]}]
            ),
            "no host",
        ),
        (
            dict(
                good,
                clusters=[
                    {
                        "name": "l",
                        "kind": "local",
                        "both": [{"url": "http://h:1", "kv_endpoint": "a:1", "kv_events": "x"}],
                    }
                ],
            ),
            "kv_events",
        ),
        (dict(good, model=""), "model"),
        (dict(good, threshold={"tokens": float("inf")}), "finite"),
        (dict(good, threshold={"egress_window_s": float("nan")}), "finite"),
        (dict(good, threshold={"tokens": 50000, "max_tokens": 100}), "max_tokens"),
    ]
    for raw, msg in cases:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(RouterConfigError, match=msg):
            load_router_config(path)


def test_kv_events_feed_the_prefix_index() -> None:
    pytest.importorskip("vllm")
    import msgspec
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

    from prfaas_plugin.fleet.prefix_index import PrefixIndex
    from prfaas_plugin.router.events import apply_payload

    idx = PrefixIndex(block_size=4)
    tokens = list(range(12))
    stored = BlockStored(
        block_hashes=[b"h1", b"h2", b"h3"],
        parent_block_hash=None,
        token_ids=tokens,
        block_size=4,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[stored]))
    assert apply_payload(idx, "http://a", payload) == 1
    assert idx.longest_prefix(tokens + [99], ["http://a"]) == (12, "http://a")
    removed = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=[BlockRemoved(block_hashes=[b"h2"], medium="GPU")]))
    apply_payload(idx, "http://a", removed)
    assert idx.longest_prefix(tokens, ["http://a"]) == (4, "http://a")


def test_chat_template_kwargs_cannot_change_how_a_prompt_is_counted(tokenizer) -> None:
    """Keys naming the tokenizer call's own options are not template variables: return_tensors
    counted a long prompt as one token, past max_prompt_tokens."""
    msgs = [{"role": "user", "content": words(40)}]
    want = tokenizer.chat_tokens(msgs, {})
    for kw in (
        {"return_tensors": "np"},
        {"return_dict": True},
        {"truncation": True, "max_length": 3},
        {"tokenize": False},
    ):
        assert tokenizer.chat_tokens(msgs, {"chat_template_kwargs": kw}) == want, kw


def test_admin_endpoints_answer_unreadable_numbers_with_a_400(fleet) -> None:
    r, p, _ = fleet
    huge = b"1" + b"0" * 400  # larger than a float
    resp = httpx.put(r.url + "/admin/threshold", content=b'{"threshold_tokens": ' + huge + b"}")
    assert resp.status_code == 400, resp.text
    for body in (b'{"url": "x", "drain": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000):
        resp = httpx.post(r.url + "/admin/instances/drain", content=body)
        assert resp.status_code == 400, resp.text[:200]
    resp = httpx.post(r.url + "/admin/instances/drain", json={"url": p.url, "drain": False})
    assert resp.status_code == 200


def test_chat_prompts_count_template_tokens(tokenizer) -> None:
    ids = tokenizer.chat_tokens([{"role": "user", "content": words(7)}], {})
    assert len(ids) == 7 + 2  # "user:" + 7 words + "assistant:" (the generation prompt)
    assert tokenizer.completion_tokens(words(5)) == tokenizer.completion_tokens(
        [*tokenizer.completion_tokens(words(5))]
    )


def test_example_config_validates() -> None:
    cfg = load_router_config(Path(__file__).resolve().parents[1] / "examples" / "router" / "clusters.yaml")
    assert cfg.threshold.mode == "auto" and Path(cfg.threshold.planner).is_file()
    assert [c.kind for c in cfg.clusters] == ["prfaas", "local"]


# -- SGLang pools: its PD protocol instead of kv_transfer_params -----------------------------------
def _sglang_cfg(p: FakeBackend, lp: FakeBackend, d: FakeBackend) -> RouterConfig:
    """No kv_endpoint anywhere: SGLang decode instances find the prefill through its bootstrap server."""
    return RouterConfig.model_validate(
        {
            "model": MODEL,
            "tokenizer": "/unused",
            "block_size": 4,
            "engine": "sglang",
            "threshold": {"mode": "fixed", "tokens": 40},
            "bandwidth_mode": "scarce",
            "timeouts": {"health_every_s": 0.3, "prefill_s": 10},
            "clusters": [
                {"name": "remote", "kind": "prfaas", "prefill": [{"url": p.url, "bootstrap_port": 9100}]},
                {
                    "name": "local",
                    "kind": "local",
                    "prefill": [{"url": lp.url, "bootstrap_port": 9200}],
                    "decode": [{"url": d.url}],
                },
            ],
        }
    )


def _pair_bodies(prefill: FakeBackend, decode: FakeBackend) -> tuple[dict, dict]:
    (pb,), (db,) = [s.body for s in prefill.wait_seen()], [s.body for s in decode.wait_seen()]
    return pb, db


@pytest.mark.parametrize("stream", [False, True])
def test_sglang_pool_gets_bootstrap_fields_on_both_sides(tokenizer, stream) -> None:
    p, lp, d = FakeBackend("prefill").start(), FakeBackend("prefill").start(), FakeBackend("decode").start()
    r = RunningRouter(_sglang_cfg(p, lp, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(100, stream=stream))  # long: remote prefill
        assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "prfaas"
        pb, db = _pair_bodies(p, d)
        assert not lp.seen
        for b in (pb, db):
            assert "kv_transfer_params" not in b
            assert (b["bootstrap_host"], b["bootstrap_port"]) == ("127.0.0.1", 9100)
        assert pb["bootstrap_room"] == db["bootstrap_room"] and 0 <= pb["bootstrap_room"] < 2**63
        assert pb["stream"] is False and db.get("stream", False) is stream  # the prefill's answer is read whole
        assert pb["max_tokens"] == db["max_tokens"] == 8  # SGLang's prefill gets the client's body
        rec = r.router.records[resp.headers["x-request-id"]]
        assert rec.transfer_id == f"bootstrap_room={db['bootstrap_room']}"

        d.seen.clear()
        resp = r.post("/v1/completions", _completion(10, start=7, stream=stream))  # short: local P/D pair
        assert resp.status_code == 200 and resp.headers["x-prfaas-route"] == "local"
        pb2, db2 = _pair_bodies(lp, d)
        assert (pb2["bootstrap_host"], pb2["bootstrap_port"], pb2["bootstrap_room"]) == (
            db2["bootstrap_host"],
            9200,
            db2["bootstrap_room"],
        )
        assert db2["bootstrap_room"] != db["bootstrap_room"]
    finally:
        r.stop()
        p.stop()
        lp.stop()
        d.stop()


def test_sglang_remote_prefill_failure_retries_on_a_local_pair(tokenizer) -> None:
    p = FakeBackend("prefill", status=500).start()
    # a decode answers only once its KV arrived: here, later than the prefill's failure
    lp, d = FakeBackend("prefill").start(), FakeBackend("decode", decode_delay_s=0.5).start()
    r = RunningRouter(_sglang_cfg(p, lp, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(100))
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-prfaas-fallback"] == "prfaas failed"
        (lpb,) = [s.body for s in lp.wait_seen()]
        rooms = [s.body["bootstrap_room"] for s in d.seen]
        assert lpb["bootstrap_port"] == 9200 and rooms[-1] == lpb["bootstrap_room"]
        assert len(set(rooms)) == len(rooms)  # a fresh room for the retry
    finally:
        r.stop()
        p.stop()
        lp.stop()
        d.stop()


def test_vllm_pools_still_need_a_transfer_endpoint_per_decoder() -> None:
    with pytest.raises(ValueError, match="needs kv_endpoint"):
        RouterConfig.model_validate(
            {
                "model": MODEL,
                "tokenizer": "/unused",
                "clusters": [
                    {
                        "name": "local",
                        "kind": "local",
                        "prefill": [{"url": "http://a:1"}],
                        "decode": [{"url": "http://b:1"}],
                    }
                ],
            }
        )


# -- long-term loop applied: SGLang run-time role switches (threshold.apply_split) -----------------
def _split_cfg(tmp_path: Path, p: FakeBackend, lp: FakeBackend, d1: FakeBackend, d2: FakeBackend) -> RouterConfig:
    return RouterConfig.model_validate(
        {
            "model": MODEL,
            "tokenizer": "/unused",
            "block_size": 4,
            "engine": "sglang",
            "threshold": {
                "mode": "auto",
                "tokens": 40,
                "planner": str(_planner_yaml(tmp_path)),
                "apply_split": True,
                "split_cooldown_s": 0.2,
                "drain_timeout_s": 10,
            },
            "timeouts": {"health_every_s": 0.3, "prefill_s": 10},
            "clusters": [
                {"name": "remote", "kind": "prfaas", "prefill": [{"url": p.url}]},
                {
                    "name": "local",
                    "kind": "local",
                    "prefill": [{"url": lp.url, "bootstrap_port": 9200}],
                    "decode": [{"url": d1.url}, {"url": d2.url}],
                },
            ],
        }
    )


def _advise(r: RunningRouter, n_prefill: int, n_decode: int) -> None:
    from prfaas_plugin.router.threshold import SplitAdvice

    r.router.controller.advice = SplitAdvice(40, 40, n_prefill, n_decode, 1.0, 64, "prefill")


def test_split_advice_is_applied_by_draining_then_switching_one_instance(tokenizer, tmp_path) -> None:
    p, lp = FakeBackend("prefill").start(), FakeBackend("prefill").start()
    # Each decode holds its request 4 s: long enough that both are open at once on a loaded machine.
    d1, d2 = FakeBackend("decode", decode_delay_s=4).start(), FakeBackend("decode", decode_delay_s=4).start()
    r = RunningRouter(_split_cfg(tmp_path, p, lp, d1, d2), tokenizer)
    try:
        # One request open on each decode instance: the switch must wait for it.
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda k=k: results.append(r.post("/v1/completions", _completion(10, start=k)).status_code)
            )
            for k in range(2)
        ]
        for t in threads:
            t.start()
        assert _eventually(lambda: d1.open_requests == 1 and d2.open_requests == 1, 10)
        held = list(range(1, 13))
        for d in (d1, d2):
            r.router.index.record(d.url, held)  # prefixes their caches hold, as the router believes
        _advise(r, 2, 1)  # the planner wants 2 prefill + 1 decode; the pool is 1 + 2
        insts = {i.url: i for i in r.router.fleet.instances}
        assert _eventually(lambda: any(i.draining for i in insts.values()), 5), "an instance must be drained first"
        drained = next(i for i in insts.values() if i.draining)
        fake = d1 if drained.url == d1.url else d2
        assert not fake.switches, "no switch while the instance still has a request open"
        for t in threads:
            t.join(20)
        assert results == [200, 200]
        assert _eventually(lambda: insts[fake.url].role == "prefill" and not insts[fake.url].draining, 5)
        assert fake.switches == [{"new_role": "prefill", "open_requests": 0}] and fake.role == "prefill"
        other = d2 if fake is d1 else d1
        # SGLang resets a switched instance's radix cache: the router forgets what it held.
        assert r.router.index.longest_prefix(held, [fake.url]) == (0, None)
        assert r.router.index.longest_prefix(held, [other.url]) == (12, other.url)
        # Now balanced: no further switch, and the switched instance is used as a prefill.
        time.sleep(0.6)
        assert len(d1.switches) + len(d2.switches) == 1
        lp.stop()  # with the original prefill gone, local pairs need the switched instance
        assert _eventually(lambda: not insts[lp.url].healthy, 5)
        n_fake, n_other = len(fake.seen), len(other.seen)
        for k in range(3):
            assert r.post("/v1/completions", _completion(10, start=20 + k)).status_code == 200
        assert len(fake.seen) == n_fake + 3 and len(other.seen) == n_other + 3
        for s in other.seen[n_other:]:  # the decode side is told to fetch from the switched instance
            assert (s.body["bootstrap_host"], s.body["bootstrap_port"]) == ("127.0.0.1", 8998)
        split = httpx.get(r.url + "/admin/split").json()
        assert split["applying"] and split["switches"][-1]["outcome"] == "switched"
        assert f'{M.ROUTER_ROLE_SWITCHES.exposed}{{outcome="switched"}} 1.0' in httpx.get(r.url + "/metrics").text
    finally:
        r.stop()
        p.stop()
        lp.stop()
        d1.stop()
        d2.stop()


def test_refused_role_switch_puts_the_instance_back_unchanged(tokenizer, tmp_path) -> None:
    p, lp = FakeBackend("prefill").start(), FakeBackend("prefill").start()
    d1 = FakeBackend("decode", role_switch_status=400).start()
    d2 = FakeBackend("decode", role_switch_status=400).start()
    r = RunningRouter(_split_cfg(tmp_path, p, lp, d1, d2), tokenizer)
    try:
        _advise(r, 2, 1)
        assert _eventually(lambda: len(d1.switches) + len(d2.switches) >= 1, 5)
        assert _eventually(lambda: "refused" in httpx.get(r.url + "/metrics").text, 5)
        assert [i.role for i in r.router.fleet.instances] == ["prefill", "prefill", "decode", "decode"]
        assert not any(i.draining for i in r.router.fleet.instances)
        assert r.post("/v1/completions", _completion(10)).status_code == 200
        assert "--enable-pd-role-switch" in httpx.get(r.url + "/admin/split").json()["switches"][0]["detail"]
    finally:
        r.stop()
        p.stop()
        lp.stop()
        d1.stop()
        d2.stop()


def test_split_planning_never_takes_the_last_instance_of_a_role() -> None:
    from prfaas_plugin.router.instances import Fleet, Instance
    from prfaas_plugin.router.rebalance import plan_switch
    from prfaas_plugin.router.threshold import SplitAdvice

    def fleet(roles: list[str], inflight: list[int]) -> Fleet:
        return Fleet(
            [
                Instance(f"http://i{k}", "local", "local", role, inflight=n)  # type: ignore[arg-type]
                for k, (role, n) in enumerate(zip(roles, inflight))
            ]
        )

    adv = lambda p, d: SplitAdvice(1, 1, p, d, 1.0, 64, "balanced")  # noqa: E731
    plan = plan_switch(adv(2, 2), fleet(["prefill", "decode", "decode", "decode"], [0, 3, 1, 2]))
    assert plan is not None and (plan.instance.url, plan.new_role) == ("http://i2", "prefill")  # least loaded
    plan = plan_switch(adv(1, 3), fleet(["prefill", "prefill", "decode", "decode"], [5, 4, 0, 0]))
    assert plan is not None and (plan.instance.url, plan.new_role) == ("http://i1", "decode")
    assert plan_switch(adv(2, 2), fleet(["prefill", "prefill", "decode", "decode"], [0] * 4)) is None  # balanced
    assert plan_switch(adv(2, 0), fleet(["prefill", "decode"], [0, 0])) is None  # would leave no decoder
    assert plan_switch(adv(3, 3), fleet(["prefill", "decode", "decode"], [0] * 3)) is None  # advice for another pool
    assert plan_switch(adv(2, 1), fleet(["both", "decode", "decode"], [0] * 3)) is None  # "both" is neither role


def test_apply_split_is_refused_where_it_cannot_work(tmp_path) -> None:
    base = {
        "model": MODEL,
        "tokenizer": "/unused",
        "clusters": [{"name": "local", "kind": "local", "both": [{"url": "http://a", "kv_endpoint": "a:1"}]}],
    }
    with pytest.raises(ValueError, match="apply_split needs engine: sglang"):
        RouterConfig.model_validate(
            {**base, "threshold": {"mode": "auto", "planner": str(_planner_yaml(tmp_path)), "apply_split": True}}
        )
    with pytest.raises(ValueError, match="apply_split needs threshold.mode auto"):
        RouterConfig.model_validate({**base, "engine": "sglang", "threshold": {"apply_split": True}})


def test_router_command_freezes_its_start_up_heap_before_serving(tmp_path, monkeypatch) -> None:
    """Full GC passes over the start-up heap (transformers, tokenizer, FastAPI) paused the event
    loop 100-250 ms at 200 streams (bench/router.py); `prfaas router` freezes that heap first."""
    import gc

    import uvicorn
    from click.testing import CliRunner

    from prfaas_plugin.cli.router import command

    cfg = {
        "model": MODEL,
        "tokenizer": str(build_tokenizer(tmp_path / "tok")),
        "clusters": [
            {"name": "local", "kind": "local", "both": [{"url": "http://127.0.0.1:9", "kv_endpoint": "127.0.0.1:9"}]}
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    frozen: list[int] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: frozen.append(gc.get_freeze_count()))
    gc.unfreeze()
    try:
        result = CliRunner().invoke(command, ["--config", str(tmp_path / "r.yaml")])
    finally:
        gc.unfreeze()
    assert result.exit_code == 0, result.output
    assert frozen and frozen[0] > 10_000, frozen


def test_a_port_out_of_range_is_refused_before_the_router_starts(tmp_path) -> None:
    from click.testing import CliRunner

    from prfaas_plugin.cli.router import command

    result = CliRunner().invoke(command, ["--config", str(tmp_path / "r.yaml"), "--port", "99999"])
    assert result.exit_code == 2 and "99999" in result.output


def test_recent_share_matches_a_recount_of_its_window() -> None:
    import random

    from prfaas_plugin.router.records import RecentShare

    rng = random.Random(7)
    share, seen = RecentShare(16, "prfaas"), []
    for _ in range(200):
        route = rng.choice(["prfaas", "local", "local"])
        seen.append(route)
        window = seen[-16:]
        assert share.add(route) == window.count("prfaas") / len(window)


# -- egress from the producers' own counters -------------------------------------------------------
def test_counter_total_sums_every_label_set_and_ignores_look_alikes() -> None:
    from prfaas_plugin.fleet.engine_metrics import counter_total
    from prfaas_plugin.protocol.metrics import SGLANG_KV_SENT_BYTES, VLLM_KV_SENT_BYTES
    from prfaas_plugin.router.egress import sent_bytes_total

    SENT_BYTES, base = VLLM_KV_SENT_BYTES.exposed, VLLM_KV_SENT_BYTES.name
    text = (
        f"# HELP {SENT_BYTES} KV bytes\n# TYPE {SENT_BYTES} counter\n"
        f'{SENT_BYTES}{{engine="0",model_name="a}}b"}} 1.5e6\n'
        f'{SENT_BYTES}{{engine="1",model_name="m"}} 2500000.0\n'
        f'{base}_created{{engine="0"}} 1.7e9\n'
        f"{SENT_BYTES}ish 99\n"
        f"{M.ENGINE_VLLM_RUNNING.exposed} 3\n"
    )
    assert counter_total(text, SENT_BYTES) == 4.0e6
    assert counter_total(f"{SENT_BYTES} 7 1700000000000\n", SENT_BYTES) == 7.0
    assert counter_total(f"{M.ENGINE_VLLM_RUNNING.exposed} 3\n", SENT_BYTES) is None
    assert sent_bytes_total(text) == 4.0e6
    assert sent_bytes_total(f'{SGLANG_KV_SENT_BYTES.exposed}{{tp_rank="0"}} 5.0\n') == 5.0
    assert sent_bytes_total(f"{M.ENGINE_SGLANG_RUNNING.exposed} 3\n") is None


def test_sglang_backends_counter_reaches_the_router_through_prometheus_multiprocess_mode(tmp_path) -> None:
    """What SGLang does with --enable-metrics: its scheduler processes (one per TP rank) write
    prometheus_client values into PROMETHEUS_MULTIPROC_DIR and its HTTP server serves them all
    through MultiProcessCollector. A 'rank' that only started shows the counter at 0; two more
    count confirmed bytes with the backend's own counter, and the exposition gives the router
    their sum."""
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from prfaas_plugin.protocol.metrics import SGLANG_KV_SENT_BYTES
    from prfaas_plugin.router.egress import SENT_BYTES, sent_bytes_total

    assert SGLANG_KV_SENT_BYTES.exposed in SENT_BYTES
    rank = (
        "from prfaas_plugin.engines.sglang.metrics import counted_bytes, record_sent\n"
        "import sys\n"
        "for n in sys.argv[1:]: record_sent(int(n))\n"
        "assert counted_bytes() == sum(map(int, sys.argv[1:]))\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    made = "from prfaas_plugin.engines.sglang.metrics import sent_bytes_counter\nsent_bytes_counter()\n"
    subprocess.run([sys.executable, "-c", made], env=env, check=True, timeout=60)  # a prefill rank at start
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    assert sent_bytes_total(generate_latest(registry).decode()) == 0  # shown from the start, at 0
    for args in (["1000000", "234"], ["5000", "0"]):
        subprocess.run([sys.executable, "-c", rank, *args], env=env, check=True, timeout=60)
    assert sent_bytes_total(generate_latest(registry).decode()) == 1_005_234


def test_egress_meter_turns_counters_into_increments_across_a_restart() -> None:
    from prfaas_plugin.router.egress import EgressMeter

    m = EgressMeter()
    assert m.update("p", 1000.0) == 0 and m.measured("p")  # the first reading is a baseline
    assert m.update("p", 1500.0) == 500
    assert m.update("p", 200.0) == 200  # restarted: counting from zero again
    m.forget("p")
    assert not m.measured("p")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_egress_comes_from_the_producers_counter_not_its_answers(tokenizer, engine) -> None:
    p = FakeBackend("prefill", sent_bytes_counter=0.0, kv_bytes_per_token=1_000_000, sent_bytes_prefix=engine).start()
    d = FakeBackend("both").start()
    r = RunningRouter(
        _cfg(p, d, threshold={"mode": "fixed", "tokens": 40, "egress_scrape_s": 0.1, "egress_window_s": 30}), tokenizer
    )
    try:
        assert _eventually(lambda: r.router.egress.measured(p.url), 5), "the router never read the counter"
        got = r.post("/v1/completions", _completion(100))
        assert got.status_code == 200 and got.headers["x-prfaas-route"] == "prfaas"
        time.sleep(0.5)
        window_bytes = lambda: r.router.controller.egress_gbps() * 1e9 / 8 * 30  # noqa: E731
        assert window_bytes() == 0, "the producer's predicted 100 MB must not count: its counter says 0"
        p.sent_bytes_counter = 40e6  # what its receivers confirmed
        assert _eventually(lambda: abs(window_bytes() - 40e6) < 1, 5), window_bytes()
        assert r.get("/admin/threshold").json()["egress_counters"][p.url] == 40e6
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_a_producer_without_the_counter_is_measured_by_its_answers(tokenizer) -> None:
    p = FakeBackend("prefill", kv_bytes_per_token=1000).start()  # /metrics is a 404
    d = FakeBackend("both").start()
    r = RunningRouter(
        _cfg(p, d, threshold={"mode": "fixed", "tokens": 40, "egress_scrape_s": 0.1, "egress_window_s": 30}), tokenizer
    )
    try:
        time.sleep(0.3)
        assert r.post("/v1/completions", _completion(100)).headers["x-prfaas-route"] == "prfaas"
        window_bytes = lambda: r.router.controller.egress_gbps() * 1e9 / 8 * 30  # noqa: E731
        assert _eventually(lambda: abs(window_bytes() - 100 * 1000) < 1, 5), window_bytes()
        assert not r.router.egress.measured(p.url)
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_a_producer_reporting_no_bytes_is_estimated_from_its_uncached_length(tokenizer) -> None:
    """SGLang's prefill servers answer without KV bytes and have no sent-bytes counter: without an
    estimate the bandwidth loop would read their egress as 0 however full the link is."""
    p = FakeBackend("prefill", kv_bytes_per_token=0).start()  # answers "bytes": 0, /metrics is a 404
    d = FakeBackend("both").start()
    r = RunningRouter(
        _cfg(
            p,
            d,
            threshold={
                "mode": "fixed",
                "tokens": 40,
                "egress_scrape_s": 0.1,
                "egress_window_s": 30,
                "kv_bytes_per_token": 500,
            },
        ),
        tokenizer,
    )
    try:
        time.sleep(0.3)
        got = r.post("/v1/completions", _completion(100))
        assert got.headers["x-prfaas-route"] == "prfaas"
        uncached = int(got.headers["x-prfaas-uncached-tokens"])
        window_bytes = lambda: r.router.controller.egress_gbps() * 1e9 / 8 * 30  # noqa: E731
        assert _eventually(lambda: abs(window_bytes() - 500 * uncached) < 1, 5), (window_bytes(), uncached)
        assert f"{M.ROUTER_EGRESS_ESTIMATED.exposed} {float(500 * uncached)}" in r.get("/metrics").text
        assert r.router.records[got.headers["x-request-id"]].kv_bytes_estimated == 500 * uncached
        # The same prompt, longer: the decode instance holds the first part, only the rest crosses.
        again = r.post("/v1/completions", _completion(200))
        assert again.headers["x-prfaas-route"] == "prfaas"
        more = int(again.headers["x-prfaas-uncached-tokens"])
        rec2 = r.router.records[again.headers["x-request-id"]]
        assert rec2.l_prefix > 0 and more == rec2.l_total - rec2.l_prefix
        assert _eventually(lambda: rec2.kv_bytes_estimated == 500 * more, 5), (rec2.kv_bytes_estimated, more)
        assert _eventually(lambda: abs(window_bytes() - 500 * (uncached + more)) < 1, 5), (window_bytes(), more)
        # a local request crosses no link and is not estimated
        assert r.post("/v1/completions", _completion(10, start=7)).headers["x-prfaas-route"] == "local"
        time.sleep(0.3)
        assert abs(window_bytes() - 500 * (uncached + more)) < 1
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_egress_estimate_comes_from_the_planner_profile_unless_given(tmp_path) -> None:
    from prfaas_plugin.router.config import ThresholdSpec
    from prfaas_plugin.router.threshold import ThresholdController

    planner = str(_planner_yaml(tmp_path))  # s_kv_mib: 0.5 MiB at 64 tokens, 2.0 at 256, linear between
    auto = ThresholdController(ThresholdSpec(mode="auto", tokens=40, planner=planner), link_gbps=1.0)
    assert auto.predicted_kv_bytes(64) == 1 << 19
    assert auto.predicted_kv_bytes(160) == int(1.25 * (1 << 20))
    assert auto.predicted_kv_bytes(0) == 0
    given = ThresholdController(ThresholdSpec(mode="auto", tokens=40, planner=planner, kv_bytes_per_token=100.0), 1.0)
    assert given.predicted_kv_bytes(64) == 6400
    # fixed mode and no per-token figure: nothing to estimate from (docs/sglang.md says so)
    assert ThresholdController(ThresholdSpec(mode="fixed", tokens=40), 1.0).predicted_kv_bytes(64) == 0
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        ThresholdSpec(mode="fixed", tokens=40, kv_bytes_per_token=0)


def test_the_router_measures_its_own_share_of_the_time_to_first_byte(tokenizer) -> None:
    """prfaas_router_overhead_seconds leaves the instance's time out: behind an instance that
    takes 300 ms to its first token, the time to first token is >= 300 ms and the router's own
    share is milliseconds, streamed or not."""
    d = FakeBackend("both", decode_delay_s=0.3).start()
    r = RunningRouter(_cfg(None, d), tokenizer)
    try:
        for stream in (True, False):
            resp = r.post("/v1/completions", _completion(10, stream=stream))
            assert resp.status_code == 200, resp.text
        recs = httpx.get(r.url + "/admin/requests").json()["requests"]
        assert [x["stream"] for x in recs] == [True, False]
        for rec in recs:
            assert rec["ttft_s"] >= 0.3, rec
            assert 0 < rec["overhead_s"] < 0.1, rec
        m = httpx.get(r.url + "/metrics").text
        assert f'{M.ROUTER_OVERHEAD.name}_count{{route="local"}} 2.0' in m
    finally:
        r.stop()
        d.stop()


# -- Failures in the middle of a request: nothing leaks, and the client learns what happened ------
def _leases_back(r: RunningRouter) -> bool:
    return _eventually(lambda: all(i.inflight == 0 for i in r.router.fleet.instances), 5)


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_an_integer_too_long_to_read_is_a_client_error(fleet, path) -> None:
    r, _, _ = fleet
    raw = b'{"model": "' + MODEL.encode() + b'", "prompt": "w1 w2", "max_tokens": ' + b"9" * 5000 + b"}"
    resp = httpx.post(r.url + path, content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert resp.status_code == 400, resp.text[:200]


class _InfiniteBytesProducer(FakeBackend):
    """A producer whose answer reports ``"bytes": 1e999`` (JSON for infinity)."""

    async def _answer(self, request, chat):
        await request.json()
        return Response(
            b'{"id": "p", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],'
            b' "kv_transfer_params": {"status": "sent", "bytes": 1e999}}',
            media_type="application/json",
        )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reported", ["negative", "infinite"])
def test_a_producer_reporting_nonsense_bytes_breaks_nothing(tokenizer, stream, reported) -> None:
    """The byte count feeds counters and the egress estimate: a negative or infinite one reads
    as unknown, and the decode's answer reaches the client (it used to be a 500 and a lease
    held for ever)."""
    p = (
        FakeBackend("prefill", kv_bytes_per_token=-1000)
        if reported == "negative"
        else _InfiniteBytesProducer("prefill")
    ).start()
    d = FakeBackend("both", decode_delay_s=0.3).start()  # the producer has answered by then
    r = RunningRouter(_cfg(p, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(100, stream=stream))
        assert resp.status_code == 200, resp.text[:200]
        assert resp.headers["x-prfaas-route"] == "prfaas"
        assert _leases_back(r)
        rec = r.router.records[resp.headers["x-request-id"]]
        assert _eventually(lambda: rec.transfer_status == "sent", 5) and rec.kv_bytes == 0
    finally:
        r.stop()
        p.stop()
        d.stop()


def test_sglang_a_request_the_engines_refuse_is_the_clients_4xx(tokenizer) -> None:
    """With one prefill in the local cluster there is nowhere to fall back to: the engine's own
    400 (a client mistake) is the answer, not a 502."""
    p = FakeBackend("prefill").start()
    lp, d = FakeBackend("prefill", status=400).start(), FakeBackend("decode", status=400).start()
    r = RunningRouter(_sglang_cfg(p, lp, d), tokenizer)
    try:
        resp = r.post("/v1/completions", _completion(10))
        assert resp.status_code == 400, resp.text[:300]
        assert "refused" in resp.json()["error"]["message"]
        assert _leases_back(r)
    finally:
        r.stop()
        p.stop()
        lp.stop()
        d.stop()


class _DecodeRefusingFirst(FakeBackend):
    """An SGLang decode that reports its first request's transfer failed (HTTP 500)."""

    async def _answer(self, request, chat):
        if not self.seen:
            await super()._answer(request, chat)  # recorded as seen, answer dropped
            return JSONResponse({"error": {"message": "transfer failed"}}, status_code=500)
        return await super()._answer(request, chat)


def test_sglang_a_client_leaving_as_the_producer_is_cancelled_leaks_nothing(tokenizer, monkeypatch) -> None:
    """The decode answered an error while the producer still ran: the router cancels the
    producer and waits for it. A client leaving during that wait must cancel the request, not
    be swallowed (the fallback it then started was never read, its lease never released). A
    producer request slow to cancel widens the window."""
    from prfaas_plugin.router import flow as flow_mod

    real_produce = flow_mod.Flow._produce

    async def slow_to_cancel(self, *a, **kw):
        try:
            return await real_produce(self, *a, **kw)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise

    monkeypatch.setattr(flow_mod.Flow, "_produce", slow_to_cancel)
    p = FakeBackend("prefill", prefill_delay_s=3.0).start()
    lp = FakeBackend("prefill").start()
    d = _DecodeRefusingFirst("decode", decode_delay_s=3.0).start()
    r = RunningRouter(_sglang_cfg(p, lp, d), tokenizer)
    try:
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", r.url + "/v1/completions", json=_completion(100, stream=True), timeout=0.3) as s:
                s.read()
        assert _leases_back(r), {i.url: i.inflight for i in r.router.fleet.instances}
        time.sleep(0.5)
        assert len(d.seen) == 1, "no fallback request after the client left"
    finally:
        r.stop()
        p.stop()
        lp.stop()
        d.stop()


class _CutMidAnswer(FakeBackend):
    """An engine that dies after the first piece of its answer (the connection drops)."""

    async def _answer(self, request, chat):
        body = await request.json()
        piece = (
            'data: {"id": "d", "choices": [{"index": 0, "text": "half", "finish_reason": null}]}\n\n'
            if body.get("stream")
            else '{"id": "d", "choices": [{"index": 0, "te'
        )

        async def gen():
            yield piece
            await asyncio.sleep(0.1)
            raise RuntimeError("engine died mid-answer")

        return StreamingResponse(gen(), media_type="text/event-stream" if body.get("stream") else "application/json")


def test_an_answer_cut_upstream_is_an_error_for_the_client_and_the_record(tokenizer) -> None:
    """Streamed: the client gets what came, then an error event and no ``[DONE]`` (the OpenAI
    SDKs raise on it), not a clean end it would take for a finished answer. Whole: a 502. The
    request's record says 502 either way."""
    d = _CutMidAnswer("both").start()
    r = RunningRouter(_cfg(None, d), tokenizer)
    try:
        with httpx.stream("POST", r.url + "/v1/completions", json=_completion(5, stream=True), timeout=10) as s:
            data = s.read()
            rid = s.headers["x-request-id"]
        assert b'"half"' in data and b'"error"' in data and b"[DONE]" not in data, data
        assert r.router.records[rid].status == 502 and r.router.records[rid].error
        resp = r.post("/v1/completions", _completion(5, start=1))
        assert resp.status_code == 502
        assert r.router.records[resp.json()["error"]["request_id"]].status == 502
        assert _leases_back(r)
    finally:
        r.stop()
        d.stop()
