"""Subscribing to vLLM's KV-cache events (``--kv-events-config`` with the zmq publisher) to keep
the prefix index in step with what each instance really caches (and evicts).

Wire format (vllm/distributed/kv_events.py): multipart (topic, 8-byte sequence, msgpack payload);
the payload is an array ``[ts, events, dp_rank]``; each event is a tagged map
(``{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., "token_ids": [...],
"block_size": N, ...}``) or, depending on the encoder, a tagged array. Needs pyzmq and msgspec
(both come with vLLM); without them the router runs on its own routing record.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prfaas_plugin.fleet.prefix_index import PrefixIndex

log = logging.getLogger("prfaas.router")

_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


def _as_event(ev: Any) -> tuple[str, dict[str, Any]] | None:
    if isinstance(ev, dict):
        kind = ev.get("type")
        return (kind, ev) if kind in _FIELDS else None
    if isinstance(ev, (list, tuple)) and ev and ev[0] in _FIELDS:
        kind = ev[0]
        return kind, dict(zip(_FIELDS[kind], ev[1:]))
    return None


def apply_payload(index: PrefixIndex, instance: str, payload: bytes) -> int:
    """Decode one published batch and apply it; returns the number of events applied."""
    import msgspec

    batch = msgspec.msgpack.decode(payload)
    events = batch[1] if isinstance(batch, (list, tuple)) else batch.get("events", [])
    n = 0
    for raw in events:
        parsed = _as_event(raw)
        if parsed is None:
            continue
        kind, ev = parsed
        hashes = [bytes(h) if isinstance(h, (bytearray, memoryview)) else h for h in ev.get("block_hashes") or []]
        if kind == "BlockStored":
            index.block_stored(
                instance, hashes, ev.get("parent_block_hash"), ev.get("token_ids") or [], int(ev.get("block_size") or 0)
            )
        elif kind == "BlockRemoved":
            index.block_removed(instance, hashes)
        else:
            index.clear_instance(instance)
        n += 1
    return n


class EventSubscriber:
    """One background thread per instance endpoint; stops when ``stop()`` is called."""

    def __init__(self, index: PrefixIndex, instance: str, endpoint: str) -> None:
        self.index, self.instance, self.endpoint = index, instance, endpoint
        self._stop = threading.Event()
        self.applied = 0
        self.thread = threading.Thread(target=self._run, name=f"kv-events {instance}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)

    def _run(self) -> None:
        import zmq

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVTIMEO, 200)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                try:
                    frames = sock.recv_multipart()
                except zmq.Again:
                    continue
                try:
                    self.applied += apply_payload(self.index, self.instance, frames[-1])
                except Exception as exc:
                    log.warning("kv events from %s: undecodable batch dropped (%s)", self.instance, exc)
        finally:
            sock.close()
