"""Many sessions at once, interleaved, and no leak of buffers, sessions, threads or
connections after 1000 requests."""

from __future__ import annotations

import gc
import os
import random
import threading
import time
import weakref

import numpy as np
from transfer_helpers import FP, ArraySink, manifest, pair, random_items, token

from prfaas_plugin.transfer import ReceiverConfig, SenderConfig


def test_concurrent_interleaved_sessions_bit_exact():
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=16 << 10, connections=3))
    try:
        rng = np.random.default_rng(7)
        sessions = []
        for r in range(16):
            sizes = {f"r{r}.L{i}": int(rng.integers(1, 150_000)) for i in range(int(rng.integers(1, 6)))}
            items, data = random_items(rng, sizes)
            sink, tok = ArraySink(), token()
            rh = rx.expect(f"c{r}", tok, FP, sink)
            sh = tx.open(rx.endpoint, manifest(f"c{r}", items), tok)
            sessions.append((items, data, sink, rh, sh))
        # Producers on 4 threads send items of all sessions in a shuffled, interleaved order.
        work = [(sh, it.name, data[it.name]) for items, data, _, _, sh in sessions for it in items]
        random.Random(3).shuffle(work)

        def produce(part):
            for sh, name, arr in part:
                sh.send(name, arr)

        threads = [threading.Thread(target=produce, args=(work[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for items, data, sink, rh, sh in sessions:
            sh.done.result(timeout=30)
            rh.done.result(timeout=30)
            for it in items:
                assert np.array_equal(sink.arrays[it.name], data[it.name]), it.name
    finally:
        tx.close()
        rx.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_leaks_after_1000_requests():
    rx, tx = pair(ReceiverConfig(), SenderConfig(chunk_bytes=4096, connections=2))
    try:
        rng = np.random.default_rng(9)
        payload = {f"L{i}": rng.integers(0, 256, 6000, dtype=np.uint8) for i in range(3)}
        items, _ = random_items(rng, {k: len(v) for k, v in payload.items()})

        def batch(start, n, refs=None):
            live = []
            for r in range(start, start + n):
                sink, tok = ArraySink(), token()
                rh = rx.expect(f"leak{r}", tok, FP, sink, deadline_s=30)
                sh = tx.open(rx.endpoint, manifest(f"leak{r}", items), tok, deadline_s=30)
                for k, v in payload.items():
                    sh.send(k, v)
                live.append((sink, rh, sh))
            for sink, rh, sh in live:
                sh.done.result(timeout=30)
                rh.done.result(timeout=30)
                assert np.array_equal(sink.arrays["L2"], payload["L2"])
                if refs is not None:
                    refs.extend(weakref.ref(a) for a in sink.arrays.values())

        batch(0, 50)  # warm up: connections opened, thread pools filled
        gc.collect()
        fds0 = _fds()
        threads0 = len([t for t in threading.enumerate() if not t.name.startswith("prfaas-rx-grpc")])
        refs: list = []
        for b in range(1, 20):
            batch(b * 50, 50, refs if b == 19 else None)
        gc.collect()
        st_tx, st_rx = tx.stats(), rx.stats()
        assert st_tx["requests_active"] == 0 and st_rx["sessions_active"] == 0
        assert st_tx["requests_ok"] == 1000 and st_rx["sessions_ok"] == 1000
        assert st_tx["connections"] == 2, "data connections must be reused, not reopened"
        assert st_rx["data_connections"] == 2
        assert all(r() is None for r in refs), "a destination buffer outlived its request"

        # Control threads end with their request (allow a few still exiting); the gRPC worker
        # pool grows with concurrency up to its configured bound, which is not a leak.
        def ours():
            return [t for t in threading.enumerate() if not t.name.startswith("prfaas-rx-grpc")]

        deadline = time.monotonic() + 5
        while len(ours()) > threads0 + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ours()) <= threads0 + 4, [t.name for t in ours()]
        pool = [t for t in threading.enumerate() if t.name.startswith("prfaas-rx-grpc")]
        assert len(pool) <= rx.config.max_workers
        assert _fds() <= fds0 + 4
    finally:
        tx.close()
        rx.close()
