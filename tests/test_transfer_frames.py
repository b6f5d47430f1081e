"""Multi-chunk data frames on the TCP plane: consecutive whole chunks of one item travel as one
frame (fewer headers, checksums and syscalls per byte), without losing striping, resends or
compatibility with receivers that take one chunk per frame."""

from __future__ import annotations

import numpy as np
import pytest
from transfer_helpers import FP, ArraySink, manifest, proxied_pair, random_items, token

from prfaas_plugin.transfer import ProtocolError, SenderConfig, wire

CHUNK = 64 << 10
SIZES = {f"L{i}": 1 << 20 for i in range(4)} | {"tail": 3 * CHUNK + 123}
FRAMED = SenderConfig(chunk_bytes=CHUNK, frame_bytes=8 * CHUNK, connections=2)
CK = wire.CHECKSUMS[wire.PLAINTEXT_DEFAULT[0]]  # what the default plaintext session negotiates


def _run(proxy, rx, tx, rid: str, seed: int):
    items, data = random_items(np.random.default_rng(seed), SIZES)
    sink, tok = ArraySink(), token()
    rh = rx.expect(rid, tok, FP, sink)
    sh = tx.open(rx.endpoint, manifest(rid, items), tok)
    for it in items:
        sh.send(it.name, data[it.name])
    return items, data, sink, sh, rh


def _run_exact(proxy, rx, tx, rid: str, seed: int) -> None:
    """A request that must complete on both sides with every byte landed exact."""
    items, data, sink, sh, rh = _run(proxy, rx, tx, rid, seed)
    sh.done.result(timeout=20)
    rh.done.result(timeout=20)
    for it in items:
        assert np.array_equal(sink.arrays[it.name], data[it.name])


def _whole_chunks(length: int) -> bool:
    """A frame is whole chunks, except that an item's last chunk may be short."""
    return length % CHUNK == 0 or length % CHUNK == SIZES["tail"] % CHUNK


def test_queued_chunks_travel_in_multi_chunk_frames():
    proxy, rx, tx = proxied_pair(lambda c, f, p: p, tx=FRAMED)
    try:
        _run_exact(proxy, rx, tx, "frames", 11)
        lengths = [n for _, n in proxy.lengths]
        assert sum(lengths) == sum(SIZES.values())
        assert max(lengths) > CHUNK, "no frame carried more than one chunk"
        assert max(lengths) <= 8 * CHUNK
        assert all(_whole_chunks(n) for n in lengths), lengths
        assert len(lengths) < sum(SIZES.values()) // CHUNK
    finally:
        tx.close()
        rx.close()
        proxy.close()


def test_a_receiver_that_takes_one_chunk_per_frame_gets_one_chunk_per_frame():
    # Accepted.max_frame_bytes is the receiver's max_chunk_bytes (0 from receivers that predate
    # multi-chunk frames): the sender never exceeds it.
    proxy, rx, tx = proxied_pair(
        lambda c, f, p: p, tx=SenderConfig(chunk_bytes=CHUNK, connections=2), max_chunk_bytes=CHUNK
    )
    try:
        _run_exact(proxy, rx, tx, "single", 12)
        assert max(n for _, n in proxy.lengths) == CHUNK
    finally:
        tx.close()
        rx.close()
        proxy.close()


def _forge_first_multi_chunk_frame(forge):
    """A FrameProxy mutate that hands the first frame carrying several chunks to
    ``forge(key, item, offset, payload)`` and forwards the frames it returns instead; every other
    frame passes unchanged. Returns (mutate, holder): put the proxy in ``holder[0]``."""
    holder: list = [None]
    state = {"done": False}

    def mutate(conn, frame, payload):
        if state["done"] or len(payload) < 2 * CHUNK:
            return payload
        state["done"] = True
        key, item, offset, _, _ = wire.unpack_header(holder[0].header)
        return forge(key, item, offset, payload)

    mutate.state = state  # type: ignore[attr-defined]
    return mutate, holder


def test_a_frame_overlapping_landed_chunks_is_drained_and_the_rest_asked_for_again():
    def land_first_chunk_early(key, item, offset, payload):
        # Deliver the frame's first chunk on its own first: the frame then covers one chunk
        # that already landed and several that did not.
        one = payload[:CHUNK]
        return [(wire.pack_header(key, item, offset, CHUNK, CK(one), CK.wide), one), (holder[0].header, payload)]

    mutate, holder = _forge_first_multi_chunk_frame(land_first_chunk_early)
    proxy, rx, tx = proxied_pair(mutate, tx=FRAMED)
    holder[0] = proxy
    try:
        _run_exact(proxy, rx, tx, "overlap", 13)
        assert mutate.state["done"]
        assert rx.stats()["duplicate_chunks"] >= 1
        assert sum(p["chunks_resent"] for p in tx.stats()["peers"].values()) >= 1
    finally:
        tx.close()
        rx.close()
        proxy.close()


@pytest.mark.parametrize("bad", ["not whole chunks", "past the item's end"])
def test_a_frame_that_is_not_whole_chunks_fails_the_session(bad):
    def misframe(key, item, offset, payload):
        if bad == "not whole chunks":
            part = payload[: CHUNK + 100]
            return [(wire.pack_header(key, item, offset, len(part), CK(part), CK.wide), part)]
        extra = payload + payload[:CHUNK]  # claims bytes beyond the item
        return [(wire.pack_header(key, item, SIZES["L0"] - CHUNK, len(extra), CK(extra), CK.wide), extra)]

    mutate, holder = _forge_first_multi_chunk_frame(misframe)
    proxy, rx, tx = proxied_pair(mutate, tx=FRAMED)
    holder[0] = proxy
    try:
        items, data, sink, sh, rh = _run(proxy, rx, tx, "misframe", 14)
        with pytest.raises(ProtocolError, match="bad chunk"):
            rh.done.result(timeout=20)
        with pytest.raises(Exception):
            sh.done.result(timeout=20)
    finally:
        tx.close()
        rx.close()
        proxy.close()


def test_frame_bytes_is_validated():
    with pytest.raises(ValueError, match="frame_bytes"):
        SenderConfig(chunk_bytes=1 << 20, frame_bytes=512 << 10)
    with pytest.raises(ValueError, match="frame_bytes"):
        SenderConfig(frame_bytes=128 << 20)
