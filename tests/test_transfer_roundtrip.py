"""Round trips through the real engine on loopback: bit-exact for every layout kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transfer_helpers import FP, ArraySink, manifest, pair, random_items, token

from prfaas_plugin.transfer import AuthError, ItemSpec, ReceiverConfig, SenderConfig


@pytest.fixture()
def engines():
    rx, tx = pair()
    yield rx, tx
    tx.close()
    rx.close()


# Item shapes the adapters produce: per-layer packed pages of a full-attention group, a
# sliding-window tail, a recurrent (Mamba/linear-attention) state, an MLA latent, an empty item.
LAYOUTS = {
    "full_attention": {f"g0.L{i}": 96 * 1024 + 7 * i for i in range(6)},
    "hybrid": {"g0.L0": 300_000, "g1.swa.L1": 40_000, "g2.state": 12_345, "g0.L3": 300_000},
    "mla": {f"mla.L{i}": 576 * 2 * 16 * 9 for i in range(4)},
    "with_empty_and_tiny": {"a": 0, "b": 1, "c": 65536, "d": 65537},
}


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_round_trip_bit_exact(engines, kind):
    rx, tx = engines
    rng = np.random.default_rng(hash(kind) % 2**32)
    items, data = random_items(rng, LAYOUTS[kind])
    sink = ArraySink()
    tok = token()
    rh = rx.expect(f"rt-{kind}", tok, FP, sink, deadline_s=20)
    sh = tx.open(rx.endpoint, manifest(f"rt-{kind}", items), tok, deadline_s=20)
    for it in items:
        sh.send(it.name, data[it.name])
    assert sh.done.result(timeout=20) is None
    got = rh.done.result(timeout=20)
    assert [i.name for i in got.items] == [i.name for i in items]
    for it in items:
        assert np.array_equal(sink.arrays[it.name], data[it.name]), it.name
    assert sorted(sink.done_order) == sorted(i.name for i in items)
    assert sh.progress()["items_confirmed"] == len(items)
    assert rh.progress()["bytes_received"] == sum(i.nbytes for i in items)


def test_torch_tensors_and_layerwise_order(engines):
    """CPU tensors (bf16, no numpy dtype) go zero-copy; layers sent one at a time complete in order."""
    rx, tx = engines
    layers = [torch.randn(16, 9, 576).to(torch.bfloat16) for _ in range(5)]
    items = tuple(ItemSpec(f"L{i}", t.numel() * 2, order=i) for i, t in enumerate(layers))
    dst = [torch.zeros_like(t) for t in layers]

    class TensorSink:
        order: list[str] = []

        def buffer_for(self, item):
            return dst[int(item.name[1:])]

        def item_done(self, item):
            self.order.append(item.name)

    sink = TensorSink()
    tok = token()
    rh = rx.expect("torch", tok, FP, sink)
    sh = tx.open(rx.endpoint, manifest("torch", items), tok)
    for i, t in enumerate(layers):
        sh.send(f"L{i}", t)
        # wait until this layer landed before producing the next one: strict layer order
        deadline = 100
        while f"L{i}" not in sink.order and deadline:
            rh.done.exception(timeout=0.05) if rh.done.done() else None
            deadline -= 1
            import time

            time.sleep(0.05)
    sh.done.result(timeout=20)
    rh.done.result(timeout=20)
    assert sink.order == [f"L{i}" for i in range(5)]
    for a, b in zip(layers, dst):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wait_s, lands", [(10.0, True), (0.0, False)])
def test_open_keeps_knocking_while_the_decode_side_is_late(wait_s, lands):
    """A busy decode instance may announce its half long after the prefill finished: past the
    receiver's grace the sender opens again until its announce_wait_s. With none it gives up."""
    import time

    rx, tx = pair(ReceiverConfig(announce_grace_s=0.2), SenderConfig(chunk_bytes=64 << 10, announce_wait_s=wait_s))
    try:
        items, data = random_items(np.random.default_rng(2), {"x": 100_000})
        tok = token()
        sh = tx.open(rx.endpoint, manifest("late", items), tok)
        sh.send("x", data["x"])
        time.sleep(1.0)  # five graces
        sink = ArraySink()
        rh = rx.expect("late", tok, FP, sink, deadline_s=5)
        if lands:
            sh.done.result(timeout=20)
            rh.done.result(timeout=20)
            assert np.array_equal(sink.arrays["x"], data["x"])
        else:
            assert isinstance(sh.done.exception(timeout=20), AuthError)
            rh.abort("test over")
    finally:
        tx.close()
        rx.close()


def test_send_before_accept_and_open_before_expect():
    """The router sends both requests at once: the producer may dial before the consumer
    announced the session; the receiver holds the Open for its grace period."""
    rx, tx = pair(ReceiverConfig(announce_grace_s=5.0))
    try:
        rng = np.random.default_rng(1)
        items, data = random_items(rng, {"x": 200_000})
        tok = token()
        sh = tx.open(rx.endpoint, manifest("early", items), tok)
        sh.send("x", data["x"])
        import time

        time.sleep(0.3)
        sink = ArraySink()
        rh = rx.expect("early", tok, FP, sink)
        sh.done.result(timeout=20)
        rh.done.result(timeout=20)
        assert np.array_equal(sink.arrays["x"], data["x"])
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("plane", ["grpc", "tcp-disabled-on-receiver"])
def test_grpc_data_fallback(plane):
    rxc = ReceiverConfig(enable_tcp_data=(plane == "grpc"))
    txc = SenderConfig(chunk_bytes=64 << 10, data_plane="grpc" if plane == "grpc" else "tcp", connections=2)
    rx, tx = pair(rxc, txc)
    try:
        rng = np.random.default_rng(2)
        items, data = random_items(rng, {"a": 500_000, "b": 3})
        tok = token()
        sink = ArraySink()
        rh = rx.expect("fb", tok, FP, sink)
        sh = tx.open(rx.endpoint, manifest("fb", items), tok)
        for it in items:
            sh.send(it.name, data[it.name])
        sh.done.result(timeout=20)
        rh.done.result(timeout=20)
        for it in items:
            assert np.array_equal(sink.arrays[it.name], data[it.name])
        assert all(p.startswith("grpc:") for p in tx.stats()["peers"])
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize(
    "offer,accept,expect",
    [
        (None, None, "xxh3-64"),  # the plaintext default: corruption detection, the fastest hash
        (("crc32c",), None, "crc32c"),  # a peer that only offers CRC-32C
        (None, ("crc32c", "crc32"), "crc32c"),  # a receiver that only accepts CRCs
        (("crc32",), ("crc32c", "crc32"), "crc32"),
        (("crc32c", "crc32"), ("crc32",), "crc32"),
        (("none",), None, None),  # unverified data only if the receiver opts in too
        (("none",), ("none",), "none"),  # both opted in (diagnostic flag on both sides)
    ],
)
def test_checksum_negotiation(offer, accept, expect):
    from prfaas_plugin.transfer import ProtocolError

    rx, tx = pair(
        ReceiverConfig(checksums=accept, allow_unverified_plaintext=accept == ("none",)),
        SenderConfig(chunk_bytes=64 << 10, checksums=offer, allow_unverified_plaintext=offer == ("none",)),
    )
    try:
        items, data = random_items(np.random.default_rng(4), {"a": 100_000})
        sink, tok = ArraySink(), token()
        rh = rx.expect("ck", tok, FP, sink)
        sh = tx.open(rx.endpoint, manifest("ck", items), tok)
        sh.send("a", data["a"])
        if expect is None:
            assert isinstance(sh.done.exception(timeout=10), ProtocolError)
            assert isinstance(rh.done.exception(timeout=10), ProtocolError)
        else:
            sh.done.result(timeout=10)
            rh.done.result(timeout=10)
            assert np.array_equal(sink.arrays["a"], data["a"])
            assert rh.progress()["checksum"] == expect
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("cls", [ReceiverConfig, SenderConfig])
def test_plaintext_without_checksum_refuses_to_start_unless_asked(cls):
    from prfaas_plugin.transfer import TlsConfig

    with pytest.raises(ValueError, match="allow_unverified_plaintext"):
        cls(checksums=("none",))
    with pytest.raises(ValueError, match="allow_unverified_plaintext"):
        cls(checksums=("xxh3-64", "none"))
    assert cls(checksums=("none",), allow_unverified_plaintext=True).effective_checksums == ("none",)
    with pytest.raises(ValueError, match="subset"):
        cls(checksums=("md5",))
    with pytest.raises(ValueError, match="subset"):
        cls(checksums=())
    with pytest.raises(TypeError):
        cls(checksum="none")  # unknown keys are refused
    # The defaults follow the channel: TLS needs no checksum, plaintext gets xxh3-64 first.
    assert cls().effective_checksums == ("xxh3-64", "crc32c", "crc32")
    tls = TlsConfig(cert_file="c.pem", key_file="k.pem") if cls is ReceiverConfig else TlsConfig(ca_file="ca.pem")
    assert cls(tls=tls).effective_checksums == ("none", "xxh3-64", "crc32c", "crc32")
    assert cls(tls=tls, checksums=("none",)).effective_checksums == ("none",)


class _PrefixHoldingSink(ArraySink):
    """A decode side whose prefix cache already holds the first bytes of some items."""

    def __init__(self, held: dict[str, int]) -> None:
        super().__init__()
        self.held = held

    def skip_bytes(self, item: ItemSpec) -> int:
        return self.held.get(item.name, 0)


@pytest.mark.parametrize("plane", ["tcp", "grpc"])
def test_only_the_bytes_the_receiver_lacks_cross(plane):
    """The receiver's sink names a held prefix per item (none, part of a chunk, several chunks and
    a bit, all of it); only the rest crosses, lands exactly, and every item still completes."""
    rx, tx = pair(tx=SenderConfig(chunk_bytes=64 << 10, data_plane=plane))
    try:
        rng = np.random.default_rng(7)
        sizes = {"none": 200_000, "part": 200_000, "chunks": 300_000, "all": 50_000, "empty": 0}
        held = {"part": 1_000, "chunks": 3 * (64 << 10) + 5, "all": 50_000}
        items, data = random_items(rng, sizes)
        sink = _PrefixHoldingSink(held)
        tok = token()
        rh = rx.expect("partial", tok, FP, sink, deadline_s=20)
        sh = tx.open(rx.endpoint, manifest("partial", items), tok, deadline_s=20)
        for it in items:
            sh.send(it.name, data[it.name])
        assert sh.done.result(timeout=20) is None
        rh.done.result(timeout=20)
        for it in items:
            h = held.get(it.name, 0)
            got = sink.arrays[it.name]
            assert np.array_equal(got[h:], data[it.name][h:]), it.name
            assert not got[:h].any(), f"{it.name}: a held byte was sent"
        assert sorted(sink.done_order) == sorted(sizes)
        want = sum(sizes.values()) - sum(held.values())
        assert rh.progress()["bytes_received"] == want
        assert rh.progress()["bytes_skipped"] == sum(held.values())
        assert sh.progress()["bytes_sent"] == want and sh.progress()["bytes_confirmed"] == want
        assert sh.progress()["bytes_skipped"] == sum(held.values())
    finally:
        tx.close()
        rx.close()


def test_a_sink_that_cannot_say_what_it_holds_refuses_the_session(engines):
    rx, tx = engines

    class Broken(ArraySink):
        def skip_bytes(self, item):
            raise KeyError(item.name)

    items, data = random_items(np.random.default_rng(1), {"a": 1000})
    tok = token()
    rh = rx.expect("broken-skip", tok, FP, Broken(), deadline_s=10)
    sh = tx.open(rx.endpoint, manifest("broken-skip", items), tok, deadline_s=10)
    sh.send("a", data["a"])
    with pytest.raises(Exception, match="cannot say what it holds"):
        sh.done.result(timeout=10)
    assert rh.done.exception(timeout=10) is not None
