"""Several router replicas behind one Service (docs/router-replicas.md): they agree on each
request's placement and on t because both come from what the engines report (KV events, queue
gauges, transfer counters), not from each replica's own share of the traffic; a replica that
dies loses only its own requests, and SIGTERM drains."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from replica_helpers import EngineFake, events_applied, subscribers_ready
from router_helpers import FakeBackend, RunningRouter, words
from test_router import _planner_yaml

from prfaas_plugin.demo.ports import free_port
from prfaas_plugin.faults.matrix import until
from prfaas_plugin.router.config import RouterConfig

pytest.importorskip("vllm")  # the fakes publish vLLM's own KV-event classes
MODEL = "tiny"


def _raw(remote: list[FakeBackend], local: list[FakeBackend], tokenizer_dir: str, **kw) -> dict:
    def spec(e: FakeBackend, consumer: bool) -> dict:
        s: dict = {"url": e.url}
        if isinstance(e, EngineFake):
            s["kv_events"] = e.events_endpoint
        if consumer:
            s["kv_endpoint"] = "127.0.0.1:15600"
        return s

    raw = {
        "model": MODEL,
        "tokenizer": tokenizer_dir,
        "block_size": 4,
        "clusters": [
            {"name": "remote", "kind": "prfaas", "prefill": [spec(e, False) for e in remote]},
            {"name": "local", "kind": "local", "both": [spec(e, True) for e in local]},
        ],
        "threshold": {"mode": "fixed", "tokens": 40},
        "bandwidth_mode": "scarce",
        "timeouts": {"health_every_s": 0.5, "prefill_s": 10},
    }
    raw.update(kw)
    return raw


@pytest.fixture
def engines(tiny_tokenizer):
    remote = [EngineFake("prefill", tokenizer=tiny_tokenizer).start() for _ in range(2)]
    local = [EngineFake("both", tokenizer=tiny_tokenizer).start() for _ in range(2)]
    yield remote, local
    for e in remote + local:
        e.stop()


def _completion(text: str, **kw) -> dict:
    return {"model": MODEL, "prompt": text, "max_tokens": 4, **kw}


def _sessions(n_sessions: int, turns: int) -> list[str]:
    """Multi-turn conversations interleaved round by round: turn k of session s is its first
    48 + 24k words (each turn extends the last, like a chat history)."""
    out = []
    for k in range(turns):
        for s in range(n_sessions):
            out.append(words(48 + 24 * k, start=37 * s))
    return out


def _agreement(tiny_tokenizer, tiny_tokenizer_dir, engines, prefix_source: str) -> tuple[float, int]:
    """Send the interleaved workload alternately through two replicas; before each request ask
    both where they would place it. Returns (share of warmed requests they agree on, count)."""
    remote, local = engines
    every = 0.1 if prefix_source == "events" else 0
    replicas = {"prefix_source": prefix_source, "load_scrape_s": every}
    cfg = RouterConfig.model_validate(_raw(remote, local, str(tiny_tokenizer_dir), replicas=replicas))
    routers = [RunningRouter(cfg, tiny_tokenizer), RunningRouter(cfg, tiny_tokenizer)]
    try:
        inner = [r.router for r in routers]
        if prefix_source == "events":
            subscribers_ready(inner, remote + local)
        prompts = _sessions(n_sessions=5, turns=6)
        agree = counted = 0
        for i, prompt in enumerate(prompts):
            if i == 10:
                # Traffic the routers do not see lands on local[0]: replicas that read the engines'
                # queues both steer new sessions' decode away from it.
                local[0].extra_running = 5
                if every:
                    assert until(lambda: all(r.fleet.instances[2].load >= 5 for r in inner), 10)
            body = _completion(prompt)
            answers = [r.post("/admin/decide", body).json() for r in routers]
            picks = [(a["route"], a["prefill"], a["decode"]) for a in answers]
            if i >= 5:  # warmed: every session has been seen once
                counted += 1
                agree += picks[0] == picks[1]
            resp = routers[i % 2].post("/v1/completions", body)
            assert resp.status_code == 200, resp.text
            if prefix_source == "events":
                events_applied(inner, remote + local)
        return agree / counted, counted
    finally:
        for r in routers:
            r.stop()
        local[0].extra_running = 0


def test_two_replicas_fed_by_the_engines_agree_on_placements(tiny_tokenizer, tiny_tokenizer_dir, engines) -> None:
    share, n = _agreement(tiny_tokenizer, tiny_tokenizer_dir, engines, "events")
    print(f"events: the replicas agree on {share:.0%} of {n} warmed requests")
    assert n == 25
    assert share >= 0.95, share


def test_replicas_on_their_own_records_disagree(tiny_tokenizer, tiny_tokenizer_dir, engines) -> None:
    """The contrast: each replica knows only the prefixes it routed, so the next turn of a
    conversation looks uncached to the replica that did not serve the last one."""
    share, n = _agreement(tiny_tokenizer, tiny_tokenizer_dir, engines, "own")
    print(f"own records: the replicas agree on {share:.0%} of {n} warmed requests")
    assert n == 25
    assert share < 0.5, share


def test_engine_load_counts_the_whole_fleet_and_goes_stale(tiny_tokenizer, tiny_tokenizer_dir, engines) -> None:
    remote, local = engines
    replicas = {"load_scrape_s": 0.1, "load_stale_s": 0.5}
    cfg = RouterConfig.model_validate(_raw(remote, local, str(tiny_tokenizer_dir), replicas=replicas))
    r = RunningRouter(cfg, tiny_tokenizer)
    try:
        inst = r.router.fleet.instances[2]
        assert inst.url == local[0].url
        local[0].extra_running, local[0].extra_waiting = 2, 3
        assert until(lambda: inst.load == 5, 10)
        # the least loaded decoder is now local[1]; a long request decodes there
        d = r.post("/admin/decide", _completion(words(80))).json()
        assert d["route"] == "prfaas" and d["decode"] == local[1].url
        listed = {i["url"]: i for i in r.get("/admin/instances").json()["instances"]}
        assert listed[local[0].url]["reported"] == 5
        # an engine that stops answering /metrics: its reading goes stale, own requests count
        local[0].stop()
        assert until(lambda: inst.load == inst.inflight == 0, 10)
    finally:
        r.stop()


def test_queue_gauges_parse_for_both_engines() -> None:
    from prfaas_plugin.fleet.engine_metrics import engine_queue
    from prfaas_plugin.protocol import metrics as M

    v = f'{M.ENGINE_VLLM_RUNNING.exposed}{{engine="0"}} 3\n{M.ENGINE_VLLM_RUNNING.exposed}{{engine="1"}} 1\n'
    v += f'{M.ENGINE_VLLM_WAITING.exposed}{{engine="0"}} 2\n'
    assert engine_queue(v) == 6
    s = f'{M.ENGINE_SGLANG_RUNNING.exposed}{{tp_rank="0"}} 4\n{M.ENGINE_SGLANG_WAITING.exposed}{{tp_rank="0"}} 7\n'
    assert engine_queue(s) == 11
    assert engine_queue("# nothing here\nother_metric 5\n") is None


def test_draining_an_instance_through_the_admin_api(tiny_tokenizer, tiny_tokenizer_dir, engines) -> None:
    remote, local = engines
    cfg = RouterConfig.model_validate(_raw(remote, local, str(tiny_tokenizer_dir)))
    r = RunningRouter(cfg, tiny_tokenizer)
    first, other = sorted(local, key=lambda e: e.url)  # on equal load the first url is picked
    try:
        assert r.post("/admin/decide", _completion(words(8))).json()["decode"] == first.url
        out = r.post("/admin/instances/drain", {"url": first.url, "drain": True})
        assert out.status_code == 200 and out.json()["draining"] is True
        for i in range(3):
            resp = r.post("/v1/completions", _completion(words(8, start=50 * i)))
            assert resp.status_code == 200
        assert not first.seen and len(other.seen) == 3
        r.post("/admin/instances/drain", {"url": first.url, "drain": False})
        assert r.post("/admin/decide", _completion(words(8, start=170))).json()["decode"] == first.url
        assert r.post("/admin/instances/drain", {"url": "http://nowhere:1"}).status_code == 404
        assert r.post("/admin/instances/drain", {"drain": True}).status_code == 400
        assert r.post("/admin/instances/drain", {"url": first.url, "drain": "yes"}).status_code == 400
    finally:
        r.stop()


def test_replicas_thresholds_converge(tiny_tokenizer, tiny_tokenizer_dir, engines, tmp_path: Path) -> None:
    """Auto mode: each replica re-optimises t on the lengths of its own half of the traffic and
    raises or relaxes it on the PrfaaS queue the engines report; after the workload and after a
    queue surge passes, both settle within 5% of each other."""
    remote, local = engines
    th = {
        "mode": "auto",
        "tokens": 40,
        "planner": str(_planner_yaml(tmp_path)),
        "min_samples": 16,
        "window": 256,
        "reoptimize_every_s": 0.2,
        "queue_high": 8,
        "queue_low": 2,
        "step": 0.3,
        "max_tokens": 400,
    }
    ports = [free_port(), free_port()]
    routers = []
    for i in range(2):
        peers = [f"http://127.0.0.1:{p}" for p in ports]  # itself included: a replica skips itself
        replicas = {"load_scrape_s": 0.1, "peers": peers, "peers_every_s": 0.2}
        # With admin keys set, /admin/lengths refuses a caller without one, loopback or not: the
        # replicas read each other's lengths only because they send their admin key.
        auth = {"admin_keys": {"keys": ["replica-admin-key-0123456789"]}}
        raw = _raw(remote, local, str(tiny_tokenizer_dir), threshold=th, replicas=replicas, auth=auth)
        cfg = RouterConfig.model_validate(raw)
        routers.append(RunningRouter(cfg, tiny_tokenizer, port=ports[i]))
    try:
        ctls = [r.router.controller for r in routers]
        rng = random.Random(7)
        for i in range(120):
            n = min(190, max(4, int(rng.lognormvariate(4.0, 0.8))))
            resp = routers[i % 2].post("/v1/completions", _completion(words(n, start=rng.randrange(200))))
            assert resp.status_code == 200, resp.text

        def settled() -> bool:
            return all(c.advice is not None and c.advice.samples == 120 and c.t == c.t_star for c in ctls)

        assert until(settled, 15), [c.snapshot() for c in ctls]
        assert all(c.peer_lengths for c in ctls), "each replica holds its peer's lengths"
        assert routers[0].get("/admin/lengths").status_code == 401
        t0, t1 = (c.t for c in ctls)
        assert abs(t0 - t1) <= 0.05 * max(t0, t1), (t0, t1)
        # a queue surge on the PrfaaS engines that neither replica sent: both raise t to the cap ...
        for e in remote:
            e.extra_waiting = 10
        assert until(lambda: all(c.t == 400 for c in ctls), 15), [c.t for c in ctls]
        # ... and both relax back once it drains
        for e in remote:
            e.extra_waiting = 0
        assert until(lambda: all(c.t == c.t_star for c in ctls), 15), [c.t for c in ctls]
        t0, t1 = (c.t for c in ctls)
        assert abs(t0 - t1) <= 0.05 * max(t0, t1), (t0, t1)
    finally:
        for r in routers:
            r.stop()
        for e in remote:
            e.extra_waiting = 0


def test_load_adds_requests_opened_since_the_reading_and_never_undercounts_own() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    from prfaas_plugin.router.instances import Instance
    from prfaas_plugin.router.lease import Lease

    gauge = Gauge("g", "g", ("cluster", "instance"), registry=CollectorRegistry())
    inst = Instance("http://a", "local", "local", "both")
    before = Lease(inst, gauge)  # opened before the reading: the engine's count includes it
    inst.set_reported(4, time.monotonic())
    assert inst.load == 4
    after = [Lease(inst, gauge), Lease(inst, gauge)]  # opened since: not in the reading yet
    assert inst.load == 6
    before.release()
    assert inst.load == 6  # the reading still counts it until the next one
    after[0].release()
    assert inst.load == 5
    inst.set_reported(0, time.monotonic())
    assert inst.load == 1 == inst.inflight  # a low reading never hides this replica's own requests
    inst.set_reported(3, time.monotonic() - 60)
    assert inst.load == 1  # stale: own requests only
    after[1].release()
    assert inst.inflight == 0 and inst.opened_since_report == 0


def test_replica_config_errors_are_clear() -> None:
    base = {
        "model": MODEL,
        "tokenizer": "/t",
        "clusters": [{"name": "l", "kind": "local", "both": [{"url": "http://a", "kv_endpoint": "a:15600"}]}],
    }
    for replicas, msg in (
        ({"peers": ["10.0.0.7:8000"]}, "http"),
        ({"peers_dns": "router-headless"}, "host:port"),
        ({"prefix_source": "redis"}, "prefix_source"),
        ({"load_scrape_s": -1}, "load_scrape_s"),
        ({"peer": []}, "peer"),
        ({"peers": ["http://10.0.0.7:8000"]}, "auth.admin_keys"),
        ({"peers_dns": "router-headless:8000"}, "auth.admin_keys"),
    ):
        with pytest.raises(ValueError, match=msg):
            RouterConfig.model_validate({**base, "replicas": replicas})
