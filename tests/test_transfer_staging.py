"""The device staging path, exercised on a CPU host: sources that 'live on a device' are copied
chunk by chunk into a bounded pool of host slots and sent from there."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transfer_helpers import FP, ArraySink, manifest, pair, token

from prfaas_plugin.transfer import ItemSpec, ReceiverConfig, SenderConfig
from prfaas_plugin.transfer.staging import PooledStager, StagingPool, torch_pinned_stager


class FakeDeviceBuffer:
    """Host memory that the stager must treat as unreachable device memory."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr


def _twin_stager(slots: int, slot_bytes: int):
    lock = threading.Lock()
    copies = []

    def copy(dst, src, offset, length):
        with lock:
            copies.append((offset, length))
        np.copyto(dst[:length], src.arr[offset : offset + length])

    pool = StagingPool(slots * slot_bytes, slot_bytes, lambda n: np.empty(n, np.uint8))
    stager = PooledStager(pool, copy, lambda o: isinstance(o, FakeDeviceBuffer), lambda o: o.arr.nbytes)
    return stager, copies


def test_staged_send_round_trip_with_bounded_pool():
    chunk = 64 << 10
    stager, copies = _twin_stager(slots=2, slot_bytes=chunk)
    rx, tx = pair(
        ReceiverConfig(), SenderConfig(chunk_bytes=chunk, connections=4, staging_bytes=2 * chunk), stager=stager
    )
    try:
        rng = np.random.default_rng(8)
        sizes = {"L0": 1_000_000, "L1": 333_333, "state": 4096}
        src = {k: rng.integers(0, 256, v, dtype=np.uint8) for k, v in sizes.items()}
        items = tuple(ItemSpec(k, v, i) for i, (k, v) in enumerate(sizes.items()))
        sink, tok = ArraySink(), token()
        rh = rx.expect("staged", tok, FP, sink)
        sh = tx.open(rx.endpoint, manifest("staged", items), tok)
        for k, v in src.items():
            sh.send(k, FakeDeviceBuffer(v))
        sh.done.result(timeout=20)
        rh.done.result(timeout=20)
        for k in sizes:
            assert np.array_equal(sink.arrays[k], src[k])
        n_chunks = sum((v + chunk - 1) // chunk for v in sizes.values())
        assert len(copies) == n_chunks == stager.copies
        assert stager.bytes_staged == sum(sizes.values())
        assert stager.pool.peak_in_use <= 2 and stager.pool.in_use == 0
    finally:
        tx.close()
        rx.close()


def test_torch_stager_copy_path_on_cpu_tensors():
    """The torch copy code of the GPU stager, forced onto CPU tensors (bf16, non-byte dtype)."""
    stager = torch_pinned_stager(4 << 20, 1 << 20, wants=lambda t: isinstance(t, torch.Tensor))
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=1 << 20, connections=2), stager=stager)
    try:
        layers = [torch.randn(300, 1000).to(torch.bfloat16) for _ in range(3)]
        items = tuple(ItemSpec(f"L{i}", t.numel() * 2, i) for i, t in enumerate(layers))
        dst = {f"L{i}": torch.zeros_like(t) for i, t in enumerate(layers)}

        class Sink(ArraySink):
            def buffer_for(self, item):
                return dst[item.name]

        tok = token()
        rh = rx.expect("torch-staged", tok, FP, Sink())
        sh = tx.open(rx.endpoint, manifest("torch-staged", items), tok)
        for i, t in enumerate(layers):
            sh.send(f"L{i}", t)
        sh.done.result(timeout=20)
        rh.done.result(timeout=20)
        for i, t in enumerate(layers):
            assert torch.equal(dst[f"L{i}"], t)
        assert stager.copies >= 3 and stager.pool.in_use == 0
    finally:
        tx.close()
        rx.close()


def test_pool_rejects_bad_sizes():
    with pytest.raises(ValueError):
        StagingPool(100, 200, lambda n: np.empty(n, np.uint8))
    stager, _ = _twin_stager(1, 1024)
    with pytest.raises(ValueError):
        with stager.stage(FakeDeviceBuffer(np.zeros(4096, np.uint8)), 0, 2048):
            pass
