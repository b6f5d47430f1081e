"""The vLLM connector's worker side against vLLM's real scheduler, on the paths where a request
ends early or a transfer fails: blocks are freed once, nothing is reported for a request vLLM
already freed, and one request's bad transfer never touches another request or the engine.

The scheduler is vLLM's own (``test_vllm_compat.make_scheduler``); the worker is the real
``WorkerSide`` over CPU caches, moving KV through the loopback fabric or the real receiver."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_vllm_compat import BLOCK, NUM_BLOCKS, free_blocks, make_request, make_scheduler, model_dir, runner_output

pytest.importorskip("vllm")

__all__ = ["model_dir"]  # the fixture, shared with test_vllm_compat
LAYERS = ("layers.0", "layers.1")


def _worker(sched, producer: bool):
    """The worker half matching ``sched``'s KV cache config (CPU caches, one group)."""
    from prfaas_plugin.engines.vllm.options import Options
    from prfaas_plugin.engines.vllm.worker import WorkerSide

    vcfg, kvc = sched.vllm_config, sched.kv_cache_config
    w = WorkerSide(vcfg, kvc, Options(listen="127.0.0.1:0"), producer=producer, consumer=not producer)
    w.register_kv_caches({n: torch.randn(2, NUM_BLOCKS, BLOCK, 2, 16) for n in LAYERS})
    return w


def _step(w, out) -> tuple[set, set, set]:
    """What the model runner does with the connector for one scheduler output."""
    w.meta = out.kv_connector_metadata
    w.start_load_kv()
    for n in LAYERS:
        w.save_kv_layer(n)
    w.wait_for_save()
    return w.transfer_results(set(out.finished_req_ids))


def _consumer(tid: str) -> dict:
    return {"prfaas_version": 1, "role": "consumer", "transfer_id": tid, "token": "k" * 32, "deadline_s": 600}


def test_a_producer_aborted_mid_chunked_prefill_is_never_reported_as_sent(model_dir: Path, fabric):
    """Its session ended early (nobody listens at the decode endpoint), then the client left
    before the last chunk: vLLM freed the blocks at once (request_finished: no delay), so a
    finished_sending for it would hit vLLM's ``assert req_id in self.requests`` (the engine dies)."""
    from vllm.v1.request import RequestStatus

    s = make_scheduler(model_dir, "kv_producer", budget=16, enable_chunked_prefill=True)
    w = _worker(s, producer=True)
    params = {
        "prfaas_version": 1,
        "role": "producer",
        "transfer_id": "p1",
        "token": "x" * 32,
        "decode_endpoint": "127.0.0.1:9",
    }
    try:
        s.add_request(make_request("p", 48, params))
        out = s.schedule()
        assert out.num_scheduled_tokens == {"p": 16}  # the first chunk only
        (t,) = out.kv_connector_metadata.sends
        assert not t.final
        sending, _, _ = _step(w, out)
        s.update_from_output(out, runner_output(out, {}, finished_sending=sending or None))
        s.finish_requests("p", RequestStatus.FINISHED_ABORTED)
        assert "p" not in s.requests  # freed at once
        for _ in range(3):
            out = s.schedule()
            sending, _, _ = _step(w, out)
            assert sending == set()
            s.update_from_output(out, runner_output(out, {}, finished_sending=sending or None))
        assert not w._sends and not w._send_futs
    finally:
        w.shutdown()


def test_a_consumer_aborted_while_its_kv_is_due_frees_its_blocks_at_once(model_dir: Path, fabric):
    """vLLM holds a consumer's blocks until the load reports; an abort must end the load, not
    leave the blocks held until the transfer deadline (600 s here)."""
    from vllm.v1.request import RequestStatus

    s = make_scheduler(model_dir, "kv_consumer")
    w = _worker(s, producer=False)
    try:
        free0 = free_blocks(s)
        s.add_request(make_request("c", 40, _consumer("tc")))
        out = s.schedule()
        _step(w, out)
        s.update_from_output(out, runner_output(out, {}))
        assert free_blocks(s) < free0
        s.finish_requests("c", RequestStatus.FINISHED_ABORTED)  # the producer never pushes
        end = time.monotonic() + 5
        while time.monotonic() < end and free_blocks(s) != free0:
            out = s.schedule()
            _, recv, failed = _step(w, out)
            s.update_from_output(out, runner_output(out, {}, finished_recving=recv or None, failed_recving=failed))
            time.sleep(0.05)
        assert free_blocks(s) == free0
        assert w.load_errors() == set()  # its blocks are gone: nothing to mark invalid
    finally:
        w.shutdown()


def test_a_transfer_id_two_requests_claim_fails_only_the_second_load(model_dir: Path):
    """The real receiver refuses a session id already expected; that must fail this request's
    load (it recomputes), not raise out of the model step and take every request with it."""
    s = make_scheduler(model_dir, "kv_consumer")
    w = _worker(s, producer=False)
    try:
        s.add_request(make_request("a", 40, _consumer("t1")))
        s.add_request(make_request("b", 40, _consumer("t1"), first=53))
        out = s.schedule()
        assert len(out.kv_connector_metadata.loads) == 2
        _, _, failed = _step(w, out)
        assert failed == {"b"} and "a" in w._loads  # a still waits for its producer
    finally:
        w.shutdown()


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_a_failed_load_does_not_hit_requests_sharing_its_cached_prefix(model_dir: Path, fabric, policy):
    """Only the blocks the load was to write are reported invalid: the locally cached prefix
    before them is shared (here with a request decoding meanwhile), which lost nothing."""
    from vllm.v1.request import RequestStatus

    s = make_scheduler(model_dir, "kv_consumer", extra={"kv_load_failure_policy": policy})
    w = _worker(s, producer=False)
    try:
        a = make_request("a", 40, None)  # a plain request, prefilled here and decoding
        s.add_request(a)
        out = s.schedule()
        s.update_from_output(out, runner_output(out, {"a": [1]}))
        s.add_request(make_request("b", 60, _consumer("tb")))  # shares a's first 32 tokens
        out = s.schedule()
        (load,) = out.kv_connector_metadata.loads
        assert load.num_local_tokens == 32
        _step(w, out)
        for h in w._loads["b"].handles:  # the transfer broke
            h.abort("transfer failed")
        end = time.monotonic() + 5
        recv: set = set()
        while not recv and time.monotonic() < end:
            _, recv, failed = w.transfer_results(set())
        assert failed == {"b"}
        bad = w.load_errors()
        assert bad and not bad & set(s.kv_cache_manager.get_block_ids("a")[0])
        s.update_from_output(
            out, runner_output(out, {"a": [2]}, finished_recving=recv, failed_recving=failed, invalid_block_ids=bad)
        )
        assert a.status == RequestStatus.RUNNING and list(a.output_token_ids) == [1, 2]
    finally:
        w.shutdown()
