"""The vLLM connector's worker halves bound to the transfer core through ``transfer.binding``:
a producer and a consumer ``WorkerSide`` move a request's KV blocks on the injected loopback
fabric, through the fault proxy, and on the real engine with TLS and mutual TLS; a wrong session token or an untrusted
certificate is refused and the consumer reports the load as failed (decode recomputes).

vLLM's configs are neighbours here (small stand-ins with the fields the worker reads); the
cache groups use vLLM's own ``FullAttentionSpec``."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transfer_helpers import make_pki

pytest.importorskip("vllm")
from vllm.v1.kv_cache_interface import FullAttentionSpec

from prfaas_plugin.engines.vllm import layout
from prfaas_plugin.engines.vllm.meta import Transfer
from prfaas_plugin.engines.vllm.options import Options
from prfaas_plugin.engines.vllm.worker import WorkerSide
from prfaas_plugin.faults import FaultKind, FaultPlan, FaultProxy
from prfaas_plugin.transfer import GrpcTcpReceiver, TransferReceiver, TransferSender
from prfaas_plugin.transfer.binding import EndpointSpec, EngineTransport, ItemNameError, rank_port
from prfaas_plugin.transfer.config import split_hostport

TOKEN = "session-token-0123456789abcdef"
BLOCK, NUM_BLOCKS, LAYERS = 4, 16, ("model.layers.0.attn", "model.layers.1.attn")


def _configs(engine_id: str) -> tuple[SimpleNamespace, SimpleNamespace]:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float16)
    kv_cache_config = SimpleNamespace(
        num_blocks=NUM_BLOCKS, kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=list(LAYERS))]
    )
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(rank=0, tensor_parallel_size=1),
        model_config=SimpleNamespace(model="/models/tiny"),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        kv_transfer_config=SimpleNamespace(engine_id=engine_id),
    )
    return vllm_config, kv_cache_config


def _worker(engine_id: str, opts: Options, producer: bool, seed: int) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    vllm_config, kv_cache_config = _configs(engine_id)
    w = WorkerSide(vllm_config, kv_cache_config, opts, producer=producer, consumer=not producer)
    g = torch.Generator().manual_seed(seed)
    caches = {n: torch.randn(2, NUM_BLOCKS, BLOCK, 2, 8, generator=g).to(torch.float16) for n in LAYERS}
    w.register_kv_caches(caches)
    return w, caches


def _move(
    p_opts: Options, d_opts: Options, p_token: str = TOKEN, deadline_s: float = 20.0
) -> tuple[set[str], dict, dict, list[int]]:
    """One request of 10 tokens (3 blocks) from a producer to a consumer; the consumer's
    (recving, failed) ids, both caches and the consumer's block ids."""
    prod, p_cache = _worker("p", p_opts, producer=True, seed=1)
    cons, d_cache = _worker("d", d_opts, producer=False, seed=2)
    try:
        src_blocks, dst_blocks = [5, 2, 9], [1, 7, 3]
        load = Transfer("r1", "xfer-1", TOKEN, deadline_s, 10, (dst_blocks,))
        cons.meta.loads = [load]
        cons.start_load_kv()
        send = Transfer("r1", "xfer-1", p_token, deadline_s, 10, (src_blocks,), endpoint=cons.receiver.endpoint)
        prod.meta.sends = [send]
        for name in LAYERS:
            prod.save_kv_layer(name)
        prod.wait_for_save()
        deadline = time.monotonic() + deadline_s + 10
        recving: set[str] = set()
        failed: set[str] = set()
        while not recving and time.monotonic() < deadline:
            _, recving, failed = cons.transfer_results(set())
            time.sleep(0.02)
        assert recving == {"r1"}, "the consumer never reported the load"
        for name in LAYERS:
            assert p_cache[name][:, src_blocks].shape == d_cache[name][:, dst_blocks].shape
        return failed, p_cache, d_cache, src_blocks
    finally:
        prod.shutdown()
        cons.shutdown()


def _same_blocks(p_cache: dict, d_cache: dict) -> bool:
    return all(torch.equal(p_cache[n][:, [5, 2, 9]], d_cache[n][:, [1, 7, 3]]) for n in LAYERS)


def test_connector_moves_blocks_on_the_injected_loopback_fabric(fabric):
    failed, p_cache, d_cache, _ = _move(Options(listen="127.0.0.1:17100"), Options(listen="127.0.0.1:17100"))
    assert not failed
    assert _same_blocks(p_cache, d_cache)
    # the injected fabric carried it, under the shared codec's names
    assert fabric.opened and fabric.opened[0].request_id == "xfer-1"
    assert {layout.parse_item_name(n)[4] for n in fabric.sent_names} == set(LAYERS)


def test_connector_wrong_token_is_refused_on_the_fabric(fabric):
    failed, p_cache, d_cache, _ = _move(
        Options(), Options(listen="127.0.0.1:17101"), p_token="not-the-token-0123456789", deadline_s=2
    )
    assert failed == {"r1"}
    assert not _same_blocks(p_cache, d_cache)


class _ProxiedTransport:
    """The real engine with the consumer's data plane reached through a fault proxy (advertised
    to producers, as a middlebox would be)."""

    def __init__(self, spec: EndpointSpec, proxy: FaultProxy) -> None:
        self.inner, self.proxy = EngineTransport(spec), proxy

    def sender(self) -> TransferSender:
        return self.inner.sender()

    def receiver(self, host: str, port: int, data_port: int = 0, advertise_data: str | None = None) -> TransferReceiver:
        rx = self.inner.receiver(host, port, data_port, advertise_data=self.proxy.endpoint)
        self.proxy.upstream = split_hostport(rx.bound_data_endpoint)
        return rx


@pytest.fixture
def proxy():
    with FaultProxy(("127.0.0.1", 9)) as p:
        old = WorkerSide.transport_factory
        WorkerSide.transport_factory = staticmethod(lambda spec: _ProxiedTransport(spec, p))
        try:
            yield p
        finally:
            WorkerSide.transport_factory = old


def test_connector_through_the_fault_proxy(proxy):
    failed, p_cache, d_cache, _ = _move(Options(), Options(listen="127.0.0.1:0"))
    assert not failed and _same_blocks(p_cache, d_cache)
    assert proxy.stats.bytes_up > 0  # the data plane really crossed the proxy


def test_connector_load_fails_when_the_proxy_resets_the_data_plane(proxy):
    proxy.set_fault(FaultPlan(FaultKind.RESET, after_bytes=0, per_connection=False))
    failed, p_cache, d_cache, _ = _move(Options(), Options(listen="127.0.0.1:0"), deadline_s=5)
    assert failed == {"r1"}
    assert not _same_blocks(p_cache, d_cache)
    assert proxy.stats.resets > 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_opts(pki, role: str, mtls: bool, client: str = "client", listen: str = "127.0.0.1:0") -> Options:
    ca = pki["ca.paths"][0]
    if role == "consumer":
        cert, key = pki["server"]
        return Options(
            listen=listen, tls_cert=cert, tls_key=key, tls_ca=ca if mtls else None, tls_require_client_cert=mtls
        )
    cert, key = pki[client] if mtls else (None, None)
    return Options(tls_cert=cert, tls_key=key, tls_ca=ca)


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_connector_round_trip_over_tls(pki, mtls):
    failed, p_cache, d_cache, _ = _move(_tls_opts(pki, "producer", mtls), _tls_opts(pki, "consumer", mtls))
    assert not failed
    assert _same_blocks(p_cache, d_cache)


def test_connector_receiver_really_serves_tls(pki):
    """The consumer built from the TLS options is a TLS endpoint: a plaintext producer fails."""
    failed, p_cache, d_cache, _ = _move(Options(), _tls_opts(pki, "consumer", mtls=False), deadline_s=3)
    assert failed == {"r1"}
    assert not _same_blocks(p_cache, d_cache)


def test_connector_mtls_refuses_an_untrusted_client(pki):
    failed, p_cache, d_cache, _ = _move(
        _tls_opts(pki, "producer", mtls=True, client="rogue-client"),
        _tls_opts(pki, "consumer", mtls=True),
        deadline_s=3,
    )
    assert failed == {"r1"}
    assert not _same_blocks(p_cache, d_cache)


def test_connector_wrong_token_is_refused_by_the_engine(pki):
    failed, p_cache, d_cache, _ = _move(
        _tls_opts(pki, "producer", mtls=False),
        _tls_opts(pki, "consumer", mtls=False),
        p_token="forged-token-0123456789",
        deadline_s=3,
    )
    assert failed == {"r1"}
    assert not _same_blocks(p_cache, d_cache)


def test_tls_options_are_validated_and_reach_the_engine(pki):
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Options(tls_cert="/x.crt")
    with pytest.raises(ValueError, match="tls_ca"):
        Options(tls_require_client_cert=True)
    opts = _tls_opts(pki, "consumer", mtls=True)
    spec = opts.endpoint_spec("e1")
    assert spec.tls.config(server=True).require_client_cert
    assert not spec.tls.config(server=False).require_client_cert  # a client never demands one
    assert Options().endpoint_spec("e1").tls.config(server=True) is None
    rx = EngineTransport(spec).receiver("127.0.0.1", 0)
    try:
        assert isinstance(rx, GrpcTcpReceiver) and rx.config.tls is not None
    finally:
        rx.close()


def test_item_names_and_rank_ports():
    name = layout.item_name(1, 16, 8, "model.layers.3.self_attn.attn", 0)
    assert name == "g1.b16.n8.p0.model.layers.3.self_attn.attn"
    assert layout.parse_item_name(name) == (1, 16, 8, 0, "model.layers.3.self_attn.attn")
    for bad in ("g1.b16.n8.p0", "x1.b16.n8.p0.L", "g1.b-1.n8.p0.L", "g1.b16.n8.p0.", "g.b1.n1.p0.L"):
        with pytest.raises(ItemNameError):
            layout.parse_item_name(bad)
    assert rank_port(0, 3) == 0 and rank_port(15600, 3) == 15603
    with pytest.raises(ValueError, match="past 65535"):
        rank_port(65535, 1)


def test_a_held_prefix_on_a_kv_split_cache_lands_every_other_block_exactly():
    """A ``[2, blocks, ...]`` cache (K and V apart, as vLLM's GPU attention backends keep it)
    packs an item as ``[2, n, row]``: the decode side's held prefix is not one leading byte
    range of it. The blocks it does not hold must land exactly; the held ones stay untouched."""
    prod, p_cache = _worker("p", Options(listen="127.0.0.1:17100"), producer=True, seed=1)
    cons, d_cache = _worker("d", Options(listen="127.0.0.1:17100"), producer=False, seed=2)
    try:
        held_before = {n: d_cache[n][:, 1].clone() for n in LAYERS}
        src, dst = [5, 2, 9], [1, 7, 3]
        cons.meta.loads = [Transfer("r1", "xfer-1", TOKEN, 20.0, 10, (dst,), num_local_tokens=BLOCK)]
        cons.start_load_kv()
        prod.meta.sends = [Transfer("r1", "xfer-1", TOKEN, 20.0, 10, (src,), endpoint=cons.receiver.endpoint)]
        prod.wait_for_save()
        deadline = time.monotonic() + 30
        recving: set[str] = set()
        while not recving and time.monotonic() < deadline:
            _, recving, failed = cons.transfer_results(set())
            time.sleep(0.02)
        assert recving == {"r1"} and not failed
        for n in LAYERS:
            assert torch.equal(d_cache[n][:, 1], held_before[n]), "a held block was written"
            assert torch.equal(d_cache[n][:, [7, 3]], p_cache[n][:, [2, 9]]), f"{n}: K or V of a sent block is wrong"
    finally:
        prod.shutdown()
        cons.shutdown()


def test_worker_refuses_unreadable_tls_files_at_startup(pki, fabric):
    """The files are checked where the engine reads them, when the worker registers its caches,
    with the option's name (not on the first request, not as a gRPC error)."""
    cert, key = pki["server"]
    with pytest.raises(ValueError, match=r"kv_connector_extra_config: tls_ca '/nonexistent/ca.pem' cannot be read"):
        _worker("d", Options(tls_cert=cert, tls_key=key, tls_ca="/nonexistent/ca.pem"), producer=False, seed=0)
    with pytest.raises(ValueError, match="a receiver serving TLS needs tls_cert and tls_key"):
        _worker("d", Options(tls_ca=pki["ca.paths"][0]), producer=False, seed=0)
    prod, _ = _worker("p", Options(tls_ca=pki["ca.paths"][0]), producer=True, seed=0)  # a sender may only verify
    prod.shutdown()
