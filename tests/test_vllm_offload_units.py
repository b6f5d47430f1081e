"""Decode-initiated offload at the unit level: the scheduler half of the connector deciding with
the exact uncached length, the background thread sending the producer request to a PrfaaS
instance, reading t from a router, and turning every failure into a local prefill.

Neighbours are fakes: the PrfaaS instance and the router are small HTTP servers on loopback
(what they answer is what vLLM and ``prfaas router`` answer); vLLM's requests are its own
``Request`` class. The end-to-end test with real vLLM servers is tests/test_vllm_inengine.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm import SamplingParams
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from prfaas_plugin.demo.ports import free_port
from prfaas_plugin.engines.vllm.meta import Transfer
from prfaas_plugin.engines.vllm.options import Options
from prfaas_plugin.engines.vllm.scheduler import SchedulerSide
from prfaas_plugin.engines.vllm.stats import PrfaaSConnectorStats, PrfaaSPromMetrics
from prfaas_plugin.engines.vllm.worker import WorkerSide
from prfaas_plugin.protocol import metrics as M
from prfaas_plugin.protocol.requests import outcome_params, transfer_params

BLOCK = 16
T = 100


class _Fake(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: Callable[[str, str, dict], tuple[int, dict]]) -> None:
        self.answer = answer
        self.seen: list[tuple[str, str, dict, dict]] = []  # (method, path, headers, body)
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: _Fake

    def _reply(self, method: str) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n)) if n else {}
        self.server.seen.append((method, self.path, dict(self.headers), body))
        status, out = self.server.answer(method, self.path, {"headers": dict(self.headers), "body": body})
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self._reply("POST")

    def do_GET(self) -> None:
        self._reply("GET")

    def log_message(self, *args: Any) -> None:
        pass


def _producer_ok(method: str, path: str, req: dict) -> tuple[int, dict]:
    """A PrfaaS vLLM: prefills, pushes, answers its outcome in ``kv_transfer_params``."""
    if path == "/metrics":
        return 200, {}
    p = req["body"]["kv_transfer_params"]
    return 200, {"choices": [{"text": "x"}], "kv_transfer_params": outcome_params(p["transfer_id"], True, 10, 100)}


@pytest.fixture
def prfaas() -> Iterator[_Fake]:
    srv = _Fake(_producer_ok)
    yield srv
    srv.shutdown()


def _configs(role: str = "kv_consumer") -> tuple[SimpleNamespace, SimpleNamespace]:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float16)
    kv_cache_config = SimpleNamespace(
        num_blocks=64, kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["model.layers.0.attn"])]
    )
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(rank=0, tensor_parallel_size=1),
        model_config=SimpleNamespace(model="/models/tiny"),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=BLOCK),
        kv_transfer_config=SimpleNamespace(
            engine_id="d", is_kv_consumer=role in ("kv_consumer", "kv_both"), is_kv_producer=role != "kv_consumer"
        ),
    )
    return vllm_config, kv_cache_config


def _side(urls: list[str], role: str = "kv_consumer", **offload: Any) -> SchedulerSide:
    opts = Options.from_extra(
        {
            "offload": {
                "prefill_urls": urls,
                "kv_endpoint": "10.0.0.5:15600",
                "threshold_tokens": T,
                "load_scrape_s": 0,
                **offload,
            }
        }
    )
    return SchedulerSide(*_configs(role), opts)


def _req(rid: str, n: int, **kw: Any) -> Request:
    return Request(rid, list(range(1000, 1000 + n)), SamplingParams(max_tokens=8), None, **kw)


def _blocks(n: int) -> Any:
    return SimpleNamespace(get_block_ids=lambda: (list(range(1, n + 1)),))


def _until(cond: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _decisions(side: SchedulerSide) -> list[list[Any]]:
    st = side.take_stats()
    return [] if st is None else st.data["offload_decisions"]


def test_options_refuse_bad_offload_configs():
    vllm_config, kv = _configs("kv_producer")
    opts = Options.from_extra({"offload": {"prefill_urls": ["http://p:8000"], "kv_endpoint": "d:15600"}})
    with pytest.raises(ValueError, match="kv_role kv_consumer or kv_both"):
        SchedulerSide(vllm_config, kv, opts)
    for bad, match in (
        ({"prefill_urls": [], "kv_endpoint": "d:1"}, "prefill_urls"),
        ({"prefill_urls": ["p:8000"], "kv_endpoint": "d:1"}, "not an http"),
        ({"prefill_urls": ["http://p"], "kv_endpoint": "d"}, "host:port"),
        ({"prefill_urls": ["http://p"], "kv_endpoint": "d:1", "deadline_s": 0}, "deadline_s"),
        ({"prefill_urls": ["http://p"], "kv_endpoint": "d:1", "thresold_tokens": 5}, "thresold_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            Options.from_extra({"offload": bad})
    with pytest.raises(ValueError, match="PRFAAS_NO_SUCH_KEY"):
        _side(["http://127.0.0.1:1"], threshold_key_env="PRFAAS_NO_SUCH_KEY")


def test_decides_with_the_exact_uncached_length(prfaas):
    side = _side([prfaas.url])
    try:
        # short: local, nothing asked of vLLM, no request to PrfaaS
        assert side.get_num_new_matched_tokens(_req("short", 60), 0) == (0, False)
        # long, 48 tokens cached here: 252 uncached > t -> async load of the rest (N-1 backoff)
        long_ = _req("long", 300)
        assert side.may_load_async(long_)
        assert side.get_num_new_matched_tokens(long_, 48) == (300 - 1 - 48, True)
        assert side.get_num_new_matched_tokens(long_, 48) == (300 - 1 - 48, True)  # asked again: same
        # long but its prefix is cached here: 400 - 320 = 80 uncached <= t stays local
        assert side.get_num_new_matched_tokens(_req("cached", 400), 320) == (0, False)
        assert _decisions(side) == [
            ["local", "within_threshold", 60, T],
            ["offload", "above_threshold", 252, T],
            ["local", "within_threshold", 80, T],
        ]
        _until(lambda: any(p == "/v1/completions" for _, p, _, _ in prfaas.seen))
        (_, _, _, body) = next(s for s in prfaas.seen if s[1] == "/v1/completions")
        assert body["prompt"] == list(range(1000, 1300)) and body["max_tokens"] == 1 and body["stream"] is False
        prod = body["kv_transfer_params"]
        cons = side._params["long"]
        assert prod["role"] == "producer" and prod["decode_endpoint"] == "10.0.0.5:15600"
        assert (prod["transfer_id"], prod["token"]) == (cons.transfer_id, cons.token)
        # the load is announced as for a router-driven consumer
        side.update_state_after_alloc(long_, _blocks(19), 300 - 1 - 48)
        meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
        assert [(t.req_id, t.num_tokens, t.num_local_tokens) for t in meta.loads] == [("long", 299, 48)]
        assert meta.aborts == []
        _until(lambda: len(side.offload.index) > 0)  # affinity: what was sent where, once it answered
        side.request_finished(long_, ([],))
        assert not side._offloaded and "long" not in side._params
    finally:
        side.shutdown()


def test_router_set_requests_are_never_decided_again(prfaas):
    side = _side([prfaas.url])
    try:
        _, cons = transfer_params("d:1", 10)
        r = _req("routed", 500)
        r.kv_transfer_params = cons
        assert side.get_num_new_matched_tokens(r, 0) == (499, True)  # the router's consumer, as before
        other = _req("other-connector", 500)
        other.kv_transfer_params = {"do_remote_prefill": True}  # another connector's params
        assert side.get_num_new_matched_tokens(other, 0) == (0, False)
        assert not side.may_load_async(other)
        assert _decisions(side) == []
        time.sleep(0.2)
        assert not [s for s in prfaas.seen if s[1] == "/v1/completions"], "offloaded a request twice"
    finally:
        side.shutdown()


def test_unsupported_requests_stay_local(prfaas):
    side = _side([prfaas.url])
    try:
        r = Request("logprobs", list(range(500)), SamplingParams(max_tokens=4, prompt_logprobs=1), None)
        assert side.get_num_new_matched_tokens(r, 0) == (0, False)
        assert _decisions(side) == [["local", "unsupported_request", 500, T]]
    finally:
        side.shutdown()


def test_unreachable_prfaas_prefills_locally_and_is_left_out():
    dead = f"http://127.0.0.1:{free_port()}"
    side = _side([dead], retry_after_s=60)
    try:
        r = _req("r1", 300)
        assert side.get_num_new_matched_tokens(r, 0) == (299, True)
        side.update_state_after_alloc(r, _blocks(19), 299)
        _until(lambda: bool(side.offload.failed))
        meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
        assert [t.req_id for t in meta.loads] == ["r1"] and meta.aborts == ["r1"]  # stopped at once
        st = side.take_stats()
        assert st is not None and st.data["offload_failures"] == ["unreachable"]
        # the instance is left out for retry_after_s: the next long request stays local at once
        assert side.get_num_new_matched_tokens(_req("r2", 300), 0) == (0, False)
        assert _decisions(side) == [["local", "prfaas_unavailable", 300, T]]
        side.request_finished(r, ([],))
    finally:
        side.shutdown()


def test_failure_before_blocks_turns_the_request_local_again():
    def failing(method: str, path: str, req: dict) -> tuple[int, dict]:
        p = req["body"]["kv_transfer_params"]
        return 200, {"kv_transfer_params": outcome_params(p["transfer_id"], False, error="receiver refused")}

    srv = _Fake(failing)
    side = _side([srv.url])
    try:
        r = _req("r1", 300)
        assert side.get_num_new_matched_tokens(r, 0) == (299, True)  # no blocks free yet: asked again later
        _until(lambda: bool(side.offload.failed))
        assert side.get_num_new_matched_tokens(r, 0) == (0, False)
        assert "r1" not in side._params
        st = side.take_stats()
        assert st is not None and st.data["offload_failures"] == ["transfer_failed"]
    finally:
        side.shutdown()
        srv.shutdown()


def test_slow_prfaas_fails_at_the_deadline():
    def slow(method: str, path: str, req: dict) -> tuple[int, dict]:
        time.sleep(3)
        return 500, {}

    srv = _Fake(slow)
    side = _side([srv.url], deadline_s=0.5)
    try:
        r = _req("r1", 300)
        side.get_num_new_matched_tokens(r, 0)
        side.update_state_after_alloc(r, _blocks(19), 299)
        t0 = time.monotonic()
        _until(lambda: bool(side.offload.failed), 5)
        assert time.monotonic() - t0 < 2
        assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).aborts == ["r1"]
        assert side.take_stats().data["offload_failures"] == ["timeout"]  # type: ignore[union-attr]
    finally:
        side.shutdown()
        srv.shutdown()


def test_threshold_from_the_router_with_its_admin_key(prfaas, monkeypatch):
    monkeypatch.setenv("PRFAAS_TEST_ADMIN_KEY", "admin-secret")
    reading = {"t": 1000.0}

    def router(method: str, path: str, req: dict) -> tuple[int, dict]:
        if req["headers"].get("authorization") != "Bearer admin-secret":
            return 401, {"error": "missing or invalid API key"}
        return 200, {"mode": "auto", "threshold_tokens": reading["t"]}

    srv = _Fake(router)
    side = _side(
        [prfaas.url],
        threshold_url=srv.url,
        threshold_key_env="PRFAAS_TEST_ADMIN_KEY",
        threshold_refresh_s=0.05,
        threshold_stale_s=0.5,
    )
    try:
        src = side.offload.threshold
        _until(lambda: src.current() == (1000.0, True))
        assert side.get_num_new_matched_tokens(_req("a", 300), 0) == (0, False)  # 300 <= 1000
        reading["t"] = 50.0
        _until(lambda: src.current() == (50.0, True))
        assert side.get_num_new_matched_tokens(_req("b", 300), 0) == (299, True)
        srv.shutdown()  # the router goes away: its reading ages out, the fixed fallback applies
        srv.server_close()
        _until(lambda: src.current() == (float(T), False), 5)
        assert [d[3] for d in _decisions(side)] == [1000.0, 50.0]
    finally:
        side.shutdown()


def test_wrong_router_key_keeps_the_fallback(prfaas, monkeypatch):
    monkeypatch.setenv("PRFAAS_TEST_ADMIN_KEY", "not-the-key")
    srv = _Fake(lambda m, p, r: (401, {}) if r["headers"].get("authorization") != "Bearer k" else (200, {}))
    side = _side(
        [prfaas.url], threshold_url=srv.url, threshold_key_env="PRFAAS_TEST_ADMIN_KEY", threshold_refresh_s=0.05
    )
    try:
        _until(lambda: len(srv.seen) >= 2)
        assert side.offload.threshold.current() == (float(T), False)
    finally:
        side.shutdown()
        srv.shutdown()


def test_choice_prefers_the_prefix_holder_then_the_least_loaded(prfaas):
    side = _side(["http://a:1", "http://b:1"], max_inflight=2)
    try:
        off = side.offload
        a, b = off.instances
        now = time.monotonic()
        tokens = list(range(64))
        a.inflight = 1
        assert off.choose(tokens, now) is b  # nobody holds it: least loaded
        off.index.record("http://a:1", tokens)
        assert off.choose(tokens, now) is a  # a holds the prefix
        a.inflight = 2
        assert off.choose(tokens, now) is b  # a is full
        b.down_until = now + 10
        assert off.choose(tokens, now) is a  # b is down: a, full or not
        a.down_until = now + 10
        assert off.choose(tokens, now) is None
        assert not off.has_capacity()
    finally:
        side.shutdown()


def test_worker_stops_an_aborted_load():
    vllm_config, kv = _configs()
    w = WorkerSide(vllm_config, kv, Options(listen=f"127.0.0.1:{free_port()}"), producer=False, consumer=True)
    w.register_kv_caches({"model.layers.0.attn": torch.zeros(2, 64, BLOCK, 2, 8, dtype=torch.float16)})
    try:
        w.meta.loads = [Transfer("r1", "xfer-1", "session-token-0123456789abcdef", 30.0, 100, (list(range(1, 8)),))]
        w.start_load_kv()
        w.meta.loads, w.meta.aborts = [], ["r1", "unknown"]
        t0 = time.monotonic()
        w.start_load_kv()
        failed: set[str] = set()
        while not failed and time.monotonic() - t0 < 5:
            _, _, failed = w.transfer_results(set())
            time.sleep(0.01)
        assert failed == {"r1"}, "the aborted load was not reported failed"
        assert time.monotonic() - t0 < 5  # long before its 30 s deadline
    finally:
        w.shutdown()


def test_decisions_reach_the_prometheus_series():
    reg = CollectorRegistry()
    types = {Counter: partial(Counter, registry=reg), Gauge: partial(Gauge, registry=reg)}
    types[Histogram] = partial(Histogram, registry=reg)
    prom = PrfaaSPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["model_name", "engine"], {0: ["m", "0"]})
    st = PrfaaSConnectorStats()
    st.record_decision("local", "within_threshold", 60, 100.0)
    st.record_decision("offload", "above_threshold", 252, 120.0)
    st.record_offload_failure("unreachable")
    assert st.reduce()["Offloaded here"] == 1 and st.reduce()["Kept local here"] == 1
    agg = PrfaaSConnectorStats().aggregate(st)  # the worker's stats merged with the scheduler's
    prom.observe(agg.data, 0)
    eng = {"model_name": "m", "engine": "0"}

    def v(spec: Any, suffix: str = "", **labels: str) -> float | None:
        return reg.get_sample_value(spec.exposed + suffix, {**eng, **labels})

    assert v(M.VLLM_OFFLOAD_DECISIONS, decision="offload", reason="above_threshold") == 1
    assert v(M.VLLM_OFFLOAD_UNCACHED_TOKENS, "_sum", decision="offload") == 252
    assert v(M.VLLM_OFFLOAD_UNCACHED_TOKENS, "_sum", decision="local") == 60
    assert v(M.VLLM_OFFLOAD_THRESHOLD) == 120.0
    assert v(M.VLLM_OFFLOAD_FAILURES, kind="unreachable") == 1
