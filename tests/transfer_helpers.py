"""Shared helpers for the transfer tests: an in-memory sink, manifests with random data,
a receiver/sender pair on loopback."""

from __future__ import annotations

import secrets
import threading
from typing import Any, Optional

import numpy as np

from prfaas_plugin.transfer import (
    GrpcTcpReceiver,
    GrpcTcpSender,
    ItemSpec,
    LayoutFingerprint,
    ReceiverConfig,
    SenderConfig,
    TransferManifest,
)

FP = LayoutFingerprint({"model": "test", "dtype": "bfloat16", "block_size": 16, "tp_rank": 0, "tp_size": 1})


class ArraySink:
    """Destination buffers as numpy arrays (weakref-able, so leak tests can see them die)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.done_order: list[str] = []
        self.lock = threading.Lock()

    def buffer_for(self, item: ItemSpec) -> memoryview:
        arr = np.zeros(item.nbytes, dtype=np.uint8)
        self.arrays[item.name] = arr
        return memoryview(arr)

    def item_done(self, item: ItemSpec) -> None:
        with self.lock:
            self.done_order.append(item.name)


def random_items(rng: np.random.Generator, sizes: dict[str, int]) -> tuple[tuple[ItemSpec, ...], dict[str, np.ndarray]]:
    items = tuple(ItemSpec(n, s, order=i) for i, (n, s) in enumerate(sizes.items()))
    data = {n: rng.integers(0, 256, size=s, dtype=np.uint8) for n, s in sizes.items()}
    return items, data


def manifest(rid: str, items: tuple[ItemSpec, ...], fp: LayoutFingerprint = FP) -> TransferManifest:
    return TransferManifest(request_id=rid, items=items, fingerprint=fp, sender_id="test-prefill")


def token() -> str:
    return secrets.token_urlsafe(24)


def pair(rx: Optional[ReceiverConfig] = None, tx: Optional[SenderConfig] = None,
         **kw: Any) -> tuple[GrpcTcpReceiver, GrpcTcpSender]:
    return GrpcTcpReceiver(rx or ReceiverConfig()), GrpcTcpSender(tx or SenderConfig(chunk_bytes=64 << 10), **kw)
