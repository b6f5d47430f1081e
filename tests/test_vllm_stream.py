"""Chunked-prefill streaming in the vLLM connector's worker halves, on the loopback fabric: a
producer announces the transfer at its first chunk and each step's finished full-attention blocks
cross before the next step runs; an abort mid-prefill fails the consumer's load (it recomputes).
vLLM's configs are small stand-ins (as in test_vllm_binding); the groups are vLLM's own specs."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("vllm")

from test_vllm_binding import LAYERS, TOKEN, _worker

from prfaas_plugin.engines.vllm import layout
from prfaas_plugin.engines.vllm.meta import Transfer
from prfaas_plugin.engines.vllm.options import Options

SRC, DST = [5, 2, 9], [1, 7, 3]  # 10 tokens = 3 blocks of 4


def _step(prod, ready: int, blocks: list[int], slice_tokens: int = 4, rid: str = "r1") -> None:
    prod.meta.sends = [
        Transfer(
            rid,
            "xfer-1",
            TOKEN,
            20.0,
            10,
            (blocks,),
            endpoint="127.0.0.1:17300",
            ready_tokens=ready,
            slice_tokens=slice_tokens,
        )
    ]
    for name in LAYERS:
        prod.save_kv_layer(name)
    prod.wait_for_save()


def _wait_load(cons, timeout_s: float = 10) -> tuple[set[str], set[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, recving, failed = cons.transfer_results(set())
        if recving:
            return recving, failed
        time.sleep(0.02)
    return set(), set()


def _pair(fabric):
    prod, p_cache = _worker("p", Options(), producer=True, seed=1)
    cons, d_cache = _worker("d", Options(listen="127.0.0.1:17300"), producer=False, seed=2)
    cons.meta.loads = [Transfer("r1", "xfer-1", TOKEN, 20.0, 10, (DST,))]
    cons.start_load_kv()
    return prod, p_cache, cons, d_cache


def test_each_chunk_is_sent_when_its_step_ends(fabric):
    prod, p_cache, cons, d_cache = _pair(fabric)
    try:
        blocks_of = lambda: sorted({layout.parse_item_name(n)[1] for n in fabric.sent_names})  # noqa: E731
        _step(prod, 4, SRC[:1])
        assert blocks_of() == [0], "the first chunk's block did not leave with the first step"
        # the manifest was announced whole at the first chunk: one item per chunk and layer
        assert sorted(i.name for i in fabric.opened[0].items) == sorted(
            layout.item_name(0, b, 1, n, 0) for b in range(3) for n in LAYERS
        )
        assert _wait_load(cons, 0.3) == (set(), set()), "the load finished before the last chunk"
        _step(prod, 8, SRC[:2])
        assert blocks_of() == [0, 1]
        _step(prod, 10, SRC)
        assert blocks_of() == [0, 1, 2]
        assert _wait_load(cons) == ({"r1"}, set())
        assert all(torch.equal(p_cache[n][:, SRC], d_cache[n][:, DST]) for n in LAYERS)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_unaligned_chunks_send_a_slice_once_it_is_whole(fabric):
    """Chunks that end inside a slice (6 tokens of 8-token slices) hold it until a later chunk
    completes it; the result is still bit-exact."""
    prod, p_cache, cons, d_cache = _pair(fabric)
    try:
        _step(prod, 6, SRC[:2], slice_tokens=8)
        assert fabric.sent_names == []
        _step(prod, 9, SRC, slice_tokens=8)
        assert {layout.parse_item_name(n)[1:3] for n in fabric.sent_names} == {(0, 2)}
        _step(prod, 10, SRC, slice_tokens=8)
        assert {layout.parse_item_name(n)[1:3] for n in fabric.sent_names} == {(0, 2), (2, 1)}
        assert _wait_load(cons) == ({"r1"}, set())
        assert all(torch.equal(p_cache[n][:, SRC], d_cache[n][:, DST]) for n in LAYERS)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_request_finished_mid_prefill_aborts_the_transfer(fabric):
    prod, _, cons, _ = _pair(fabric)
    try:
        _step(prod, 4, SRC[:1])
        sending, _, _ = prod.transfer_results({"r1"})  # aborted by the scheduler before its last chunk
        assert sending == set(), "blocks the scheduler did not hold must not be reported as sent"
        assert _wait_load(cons) == ({"r1"}, {"r1"})
        _step(prod, 8, SRC[:2])  # a late step of the finished request sends nothing more
    finally:
        prod.shutdown()
        cons.shutdown()
