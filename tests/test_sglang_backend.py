"""The prfaas backend driven through real SGLang (0.5.23): entry-point registration, flag
parsing, ``get_kv_class``, and transfers through SGLang's own bootstrap server, ZMQ control
channel and poll protocol against real CPU buffers.

Skips when SGLang is not installed (CI may not install its 11 GB); the SGLang-free tier is
``test_sglang_units.py``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None,
        reason="sglang is not installed (pip install sglang==0.5.23 to run these)",
    ),
]

os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
os.environ.setdefault("PRFAAS_SGLANG_LISTEN_HOST", "127.0.0.1")

from loopback_fabric import LoopbackFabric

from prfaas_plugin.demo.ports import free_port as _free_port

PAGE = 4  # tokens per page
N_LAYERS = 3
N_PAGES = 48  # pool pages per KV buffer
KV_ITEM = 96  # bytes per page per buffer
AUX_ITEMS = (16, 8, 40)  # bytes per request row, per metadata buffer
AUX_ROWS = 6
MAMBA_ITEMS = (72, 200)  # conv and temporal state bytes per slot
MAMBA_SLOTS = 5
SWA_ITEM = 64
SWA_PAGES = 24


def _wait(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Pool:
    """A rank's caches in host memory, registered with SGLang the way its pools do."""

    def __init__(self, seed: int, kv_item: int = KV_ITEM) -> None:
        rng = np.random.default_rng(seed)
        self.kv = [rng.integers(0, 256, (N_PAGES, kv_item), dtype=np.uint8) for _ in range(2 * N_LAYERS)]
        self.aux = [rng.integers(0, 256, (AUX_ROWS, n), dtype=np.uint8) for n in AUX_ITEMS]
        self.mamba = [rng.integers(0, 256, (MAMBA_SLOTS, n), dtype=np.uint8) for n in MAMBA_ITEMS]
        self.swa = [rng.integers(0, 256, (SWA_PAGES, SWA_ITEM), dtype=np.uint8)]

    def kv_args(self) -> Any:
        from sglang.srt.disaggregation.base.conn import KVArgs, StateType

        a = KVArgs()
        a.engine_rank = 0
        a.kv_data_ptrs = [b.ctypes.data for b in self.kv]
        a.kv_data_lens = [b.nbytes for b in self.kv]
        a.kv_item_lens = [b.shape[1] for b in self.kv]
        a.kv_layer_ids = list(range(N_LAYERS)) * 2
        a.kv_cache_dtype_str = "bfloat16"
        a.aux_data_ptrs = [b.ctypes.data for b in self.aux]
        a.aux_data_lens = [b.nbytes for b in self.aux]
        a.aux_item_lens = [b.shape[1] for b in self.aux]
        a.state_types = [StateType.MAMBA, StateType.SWA]
        a.state_data_ptrs = [[b.ctypes.data for b in self.mamba], [b.ctypes.data for b in self.swa]]
        a.state_data_lens = [[b.nbytes for b in self.mamba], [b.nbytes for b in self.swa]]
        a.state_item_lens = [[b.shape[1] for b in self.mamba], [b.shape[1] for b in self.swa]]
        a.state_layer_ids = [[0, 0], [0]]
        a.state_dim_per_tensor = [[0, 0], [0]]
        a.state_slice_outer_counts = [[1, 1], [1]]
        a.state_conv_shard_groups = [[None, None], [None]]
        a.is_hybrid_mla_backend = False
        a.swa_kv_cache_layout = "nhd"
        a.ib_device = ""
        a.gpu_id = 0
        a.kv_head_num = 1
        a.total_kv_head_num = 1
        a.page_size = PAGE
        a.system_dp_rank = 0
        a.rust_http_port = None
        a.pp_rank = 0
        a.prefill_start_layer = 0
        a.prefill_end_layer = N_LAYERS
        a.mla_compression_ratios = None
        a.num_draft_entries = 0
        return a


@pytest.fixture(scope="module")
def sgl() -> Any:
    """SGLang imported, the plugin loaded through its entry point, the process context of one
    rank published, and SGLang's bootstrap server up on a free port."""
    from sglang.srt import runtime_context as rc
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    port = _free_port()
    args = ServerArgs(
        model_path="unused",
        device="cpu",
        host="127.0.0.1",
        disaggregation_mode="prefill",
        disaggregation_transfer_backend="prfaas",
        disaggregation_bootstrap_port=port,
    )
    rc.get_context().set_server_args(args)
    rc.get_parallel().override_permanently(
        attn_tp_rank=0, attn_cp_rank=0, attn_dcp_rank=0, attn_dp_rank=0, pp_group=None
    )
    from sglang.srt.managers.disagg_service import start_disagg_service

    # SGLang's own prefill start-up path picks the bootstrap server through get_kv_class.
    server = start_disagg_service()
    yield {"args": args, "port": port, "addr": f"127.0.0.1:{port}", "server": server}
    server.close()


@pytest.fixture(params=["engine"])
def pair(sgl: Any, request: Any) -> Any:
    """A prefill and a decode manager with their pools, over the real transfer engine
    (``engine``, the default: gRPC control + TCP data on loopback) or the in-process fabric
    (``loopback``, for faults the engine cannot be told to stage)."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    from prfaas_plugin.engines.sglang import conn

    param = request.param if isinstance(request.param, dict) else {"transport": request.param}
    fabric = LoopbackFabric()
    old = conn.PrfaasKVManager.transport_factory
    if param.get("transport", "engine") == "loopback":
        conn.PrfaasKVManager.transport_factory = staticmethod(lambda cfg: fabric)
    kv_item_decode = param.get("decode_kv_item", KV_ITEM)
    p_pool, d_pool = Pool(1), Pool(2, kv_item=kv_item_decode)
    try:
        pm = conn.PrfaasKVManager(p_pool.kv_args(), DisaggregationMode.PREFILL, sgl["args"], False)
        dm = conn.PrfaasKVManager(d_pool.kv_args(), DisaggregationMode.DECODE, sgl["args"], False)
    finally:
        conn.PrfaasKVManager.transport_factory = old
    assert dm.try_ensure_parallel_info(sgl["addr"])
    yield {
        "pm": pm,
        "dm": dm,
        "p": p_pool,
        "d": d_pool,
        "fabric": fabric,
        "addr": sgl["addr"],
        "transport": param.get("transport", "engine"),
    }
    pm.close()
    dm.close()


_rooms = iter(range(1000, 10**6))


def _start(pair: Any, dst_pages: np.ndarray, aux_d: int, states_d: list) -> tuple[Any, Any, int]:
    from prfaas_plugin.engines.sglang.conn import PrfaasKVReceiver, PrfaasKVSender

    room = next(_rooms)
    sender = PrfaasKVSender(pair["pm"], pair["addr"], room)
    receiver = PrfaasKVReceiver(pair["dm"], pair["addr"], room)
    receiver.init(0)
    receiver.send_metadata(dst_pages, aux_d, states_d)
    return sender, receiver, room


def _poll_until_final(*parties: Any, timeout: float = 20.0) -> list[int]:
    from sglang.srt.disaggregation.base.conn import KVPoll

    final = (KVPoll.Success, KVPoll.Failed)
    _wait(lambda: all(p.poll() in final for p in parties), timeout, "Success/Failed")
    return [p.poll() for p in parties]


def test_plugin_registered_through_entry_point(sgl: Any) -> None:
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
    from sglang.srt.disaggregation.base.conn import KVArgs
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    from prfaas_plugin.engines.sglang import conn, plugin

    assert DISAGG_TRANSFER_BACKEND_CHOICES.count("prfaas") == 1
    backend = TransferBackend("prfaas")
    assert backend is TransferBackend.PRFAAS
    assert get_kv_class(backend, KVClassType.MANAGER) is conn.PrfaasKVManager
    assert get_kv_class(backend, KVClassType.SENDER) is conn.PrfaasKVSender
    assert get_kv_class(backend, KVClassType.RECEIVER) is conn.PrfaasKVReceiver
    assert get_kv_class(backend, KVClassType.BOOTSTRAP_SERVER) is conn.PrfaasKVBootstrapServer
    assert get_kv_class(backend, KVClassType.KVARGS) is KVArgs
    assert type(sgl["server"]) is conn.PrfaasKVBootstrapServer  # started by start_disagg_service
    from sglang.srt.managers.disagg_service import rust_server_serves_kv_bootstrap

    assert rust_server_serves_kv_bootstrap("prfaas")  # SGLANG_RUST_SERVER mode keeps working
    # SGLang's own backends still resolve, and the scheduler modules see the hooked function.
    from sglang.srt.disaggregation import decode, prefill
    from sglang.srt.managers import disagg_service

    assert get_kv_class(TransferBackend.FAKE, KVClassType.MANAGER).__name__ == "FakeKVManager"
    for mod in (prefill, decode, disagg_service):
        assert mod.get_kv_class(backend, KVClassType.SENDER) is conn.PrfaasKVSender
    # Idempotent: a second registration changes nothing.
    plugin.register()
    assert DISAGG_TRANSFER_BACKEND_CHOICES.count("prfaas") == 1
    assert [m.value for m in TransferBackend].count("prfaas") == 1


def test_flag_parses(sgl: Any) -> None:
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(
        ["--model-path", "m", "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "prfaas"]
    )
    assert ns.disaggregation_transfer_backend == "prfaas"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--disaggregation-transfer-backend", "prfaasx"])


def _chunks(pages: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, at = [], 0
    for n in sizes:
        out.append(pages[at : at + n])
        at += n
    assert at == pages.size
    return out


@pytest.mark.parametrize("pair", ["engine", "loopback"], indirect=True)
@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
def test_round_trip_bit_exact(pair: Any, layout: str) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    p, d = pair["p"], pair["d"]
    rng = np.random.default_rng(7)
    n = 13
    if layout == "scattered":
        src_pages = rng.permutation(N_PAGES)[:n].astype(np.int32)
        dst_pages = rng.permutation(N_PAGES)[:n].astype(np.int32)
    else:
        src_pages = np.arange(10, 10 + n, dtype=np.int32)
        dst_pages = np.arange(30, 30 + n, dtype=np.int32)
    src_mamba, dst_mamba = np.array([3], np.int32), np.array([1], np.int32)
    src_swa, dst_swa = np.array([5, 2, 9], np.int32), np.array([0, 17, 4], np.int32)
    aux_p, aux_d = 2, 4
    expect_kv = [b[src_pages].copy() for b in p.kv]
    expect_aux = [b[aux_p].copy() for b in p.aux]
    expect_mamba = [b[src_mamba].copy() for b in p.mamba]
    expect_swa = p.swa[0][src_swa].copy()

    from prfaas_plugin.engines.sglang.metrics import counted_bytes

    sent_before = counted_bytes()
    sender, receiver, _ = _start(pair, dst_pages, aux_d, [dst_mamba, dst_swa])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput, what="prefill WaitingForInput")
    assert receiver.poll() in (KVPoll.WaitingForInput, KVPoll.Transferring)
    sender.init(n, aux_p)
    chunks = _chunks(src_pages, [5, 4, 4])
    for c in chunks[:-1]:
        sender.send(c)
    sender.send(chunks[-1], state_indices=[src_mamba, src_swa])
    assert _poll_until_final(sender, receiver) == [KVPoll.Success, KVPoll.Success]
    if pair["transport"] == "engine":
        # What the router reads from SGLang's /metrics as this producer's egress: every byte the
        # receiver confirmed, no more (the in-process test fabric reports none).
        moved = sum(x.nbytes for x in [*expect_kv, *expect_aux, *expect_mamba, expect_swa])
        assert counted_bytes() - sent_before == moved  # counted before the room reports Success

    for b, want in zip(d.kv, expect_kv):
        np.testing.assert_array_equal(b[dst_pages], want)
    for b, want in zip(d.aux, expect_aux):
        np.testing.assert_array_equal(b[aux_d], want)
    for b, want in zip(d.mamba, expect_mamba):
        np.testing.assert_array_equal(b[dst_mamba], want)
    np.testing.assert_array_equal(d.swa[0][dst_swa], expect_swa)
    # Nothing outside the destination was touched.
    untouched = np.setdiff1d(np.arange(N_PAGES), dst_pages)
    fresh = Pool(2)
    for b, orig in zip(d.kv, fresh.kv):
        np.testing.assert_array_equal(b[untouched], orig[untouched])
    sender.clear()
    receiver.clear()


@pytest.mark.parametrize("pair", ["loopback"], indirect=True)
def test_pages_stream_per_chunk_before_the_last(pair: Any) -> None:
    """Groups complete after a chunk are on the wire before the request's last chunk."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    cfg = pair["pm"].config
    # Groups of 4 pages (below the validated minimum item size, hence model_construct).
    pair["pm"].config = type(cfg).model_construct(**{**cfg.model_dump(), "item_bytes": 4 * KV_ITEM})
    pages = np.arange(0, 12, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 0, [np.array([0], np.int32), np.array([1], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.init(12, 0)
    sender.send(pages[:8])
    _wait(lambda: any(n.startswith("kv.") for n in pair["fabric"].sent_names), what="first group sent")
    assert not any(n.startswith(("aux.", "st.")) for n in pair["fabric"].sent_names)
    assert receiver.poll() != KVPoll.Success
    sender.send(pages[8:], state_indices=[np.array([0], np.int32), np.array([1], np.int32)])
    assert _poll_until_final(sender, receiver) == [KVPoll.Success, KVPoll.Success]


def _expect_transfer_error(party: Any, match: str) -> None:
    from sglang.srt.disaggregation.common.conn import KVTransferError

    with pytest.raises(KVTransferError, match=match):
        party.failure_exception()


@pytest.mark.parametrize("pair", ["loopback"], indirect=True)
def test_link_dies_mid_transfer_both_sides_fail(pair: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    fabric = pair["fabric"]
    pages = np.arange(0, 8, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    fabric.cut = True
    sender.init(8, 1)
    sender.send(pages, state_indices=[np.array([2], np.int32), np.array([3], np.int32)])
    assert _poll_until_final(sender, receiver) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(sender, "PeerGone")
    _expect_transfer_error(receiver, "PeerGone")


def test_decode_abort_fails_prefill_and_nothing_hangs(pair: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    pages = np.arange(0, 8, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.init(8, 1)
    sender.send(pages[:4])  # half the request on the wire, then decode gives up
    receiver.abort()
    assert _poll_until_final(sender, receiver) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(receiver, "Aborted by AbortReq")
    _expect_transfer_error(sender, "(?i)abort")


def test_prefill_abort_fails_decode(pair: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    pages = np.arange(0, 8, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.init(8, 1)
    sender.send(pages[:4])
    sender.abort()
    assert _poll_until_final(sender, receiver) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(sender, "Aborted by AbortReq")
    _expect_transfer_error(receiver, "(?i)abort")


def test_state_count_mismatch_is_a_clear_failure(pair: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    pages = np.arange(0, 4, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1, 2], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.init(4, 1)
    sender.send(pages, state_indices=[np.array([0], np.int32), np.array([1, 2, 3], np.int32)])
    assert _poll_until_final(sender, receiver) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(sender, "state component 1 \\(swa\\): prefill has 3")


@pytest.mark.parametrize("pair", [{"transport": "engine", "decode_kv_item": KV_ITEM * 2}], indirect=True)
def test_layout_mismatch_refused_with_reason(pair: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    pages = np.arange(0, 4, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1], np.int32)])
    assert _poll_until_final(sender, receiver) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(receiver, "kv_item_lens")
    _expect_transfer_error(sender, "lays out its cache differently")


def test_transfer_deadline_fails_both(pair: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    pair["dm"].config = pair["dm"].config.model_copy(update={"deadline_s": 0.5})
    pages = np.arange(0, 4, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.init(4, 1)
    sender.send(pages[:2])  # prefill never sends the rest
    assert _poll_until_final(sender, receiver) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(receiver, "TransferTimeout")


def test_decode_receiver_dies_mid_transfer(pair: Any) -> None:
    """The real engine: the decode rank's transfer listener goes away after the first chunk."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    pages = np.arange(0, 8, dtype=np.int32)
    sender, receiver, _ = _start(pair, pages, 1, [np.array([0], np.int32), np.array([1], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    sender.init(8, 1)
    sender.send(pages[:4])
    pair["dm"].transfer_receiver.close()
    sender.send(pages[4:], state_indices=[np.array([2], np.int32), np.array([3], np.int32)])
    assert _poll_until_final(sender, receiver, timeout=60) == [KVPoll.Failed, KVPoll.Failed]
    _expect_transfer_error(sender, "prfaas transfer")
    _expect_transfer_error(receiver, "prfaas transfer failed")


def test_many_requests_interleaved(pair: Any) -> None:
    """Several rooms in flight at once on one manager pair, chunks interleaved, all bit-exact."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    p, d = pair["p"], pair["d"]
    rng = np.random.default_rng(11)
    perm_src, perm_dst = rng.permutation(N_PAGES), rng.permutation(N_PAGES)
    reqs = []
    for k in range(4):
        src = perm_src[k * 10 : k * 10 + 10].astype(np.int32)
        dst = perm_dst[k * 10 : k * 10 + 10].astype(np.int32)
        sm, dm_ = np.array([k], np.int32), np.array([(k + 1) % MAMBA_SLOTS], np.int32)
        sw, dw = np.array([2 * k, 2 * k + 1], np.int32), np.array([20 - 2 * k, 21 - 2 * k], np.int32)
        want = (
            [b[src].copy() for b in p.kv],
            [b[sm].copy() for b in p.mamba],
            p.swa[0][sw].copy(),
            [b[k].copy() for b in p.aux],
        )
        s_, r_, _ = _start(pair, dst, k, [dm_, dw])
        reqs.append((s_, r_, src, dst, sm, dm_, sw, dw, want, k))
    for s_, *_ in reqs:
        _wait(lambda s_=s_: s_.poll() == KVPoll.WaitingForInput)
        s_.init(10, _[-1])
    for half in (slice(0, 6), slice(6, 10)):
        for s_, r_, src, dst, sm, dm_, sw, dw, want, k in reqs:
            last = half.stop == 10
            s_.send(src[half], state_indices=[sm, sw] if last else None)
    for s_, r_, src, dst, sm, dm_, sw, dw, want, k in reqs:
        assert _poll_until_final(s_, r_) == [KVPoll.Success, KVPoll.Success]
        kv, mamba, swa, aux = want
        for b, w in zip(d.kv, kv):
            np.testing.assert_array_equal(b[dst], w)
        for b, w in zip(d.mamba, mamba):
            np.testing.assert_array_equal(b[dm_], w)
        np.testing.assert_array_equal(d.swa[0][dw], swa)
        for b, w in zip(d.aux, aux):
            np.testing.assert_array_equal(b[k], w)


def test_sglang_seams_we_rely_on_are_unchanged(sgl: Any) -> None:
    """Fails loudly when an SGLang upgrade moves a seam this backend builds on."""
    import inspect

    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.common import conn as common
    from sglang.srt.disaggregation.utils import KVClassType

    assert [KVPoll.Failed, KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring, KVPoll.Success] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert {m.name for m in KVClassType} >= {"KVARGS", "MANAGER", "SENDER", "RECEIVER", "BOOTSTRAP_SERVER"}
    send_params = list(inspect.signature(common.CommonKVSender.send).parameters)
    assert send_params[:4] == ["self", "kv_indices", "state_indices", "num_kv_tokens"]
    for cls, names in {
        common.CommonKVManager: [
            "record_failure",
            "update_status",
            "conclude_transfer",
            "conclude_failure",
            "send_kv_status_message",
            "parse_kv_status_message",
            "_room_notify_targets",
            "resolve_kv_replica_factor",
            "try_ensure_parallel_info",
            "_handle_node_failure",
            "_start_heartbeat_checker_thread",
            "handle_abort_ack_message",
        ],
        common.CommonKVReceiver: ["_send_bootstrap_message", "invalidate_cached_bootstrap_infos"],
    }.items():
        for name in names:
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name} is gone"
    meta_params = inspect.signature(common.CommonKVReceiver.send_metadata).parameters
    assert list(meta_params)[:6] == [
        "self",
        "kv_indices",
        "aux_index",
        "state_indices",
        "decode_prefix_len",
        "destination",
    ]


def test_decode_prefix_cache_hit_sends_only_the_suffix(pair: Any) -> None:
    """Decode already holds the first 8 tokens (radix cache): prefill learns the prefix length
    through SGLang's ``pop_decode_prefix_len`` and sends only the remaining pages."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    p, d = pair["p"], pair["d"]
    src = np.array([40, 41, 7, 8], np.int32)  # pages of tokens 8.. on prefill
    dst = np.array([3, 12, 13, 0], np.int32)
    sender, receiver, _ = _start(pair, dst, 5, [np.array([4], np.int32), np.array([6], np.int32)])
    _wait(lambda: sender.poll() == KVPoll.WaitingForInput)
    assert sender.pop_decode_prefix_len() == 0  # the metadata above carried none
    from prfaas_plugin.engines.sglang.conn import PrfaasKVReceiver, PrfaasKVSender

    room = next(_rooms)
    sender2 = PrfaasKVSender(pair["pm"], pair["addr"], room)
    receiver2 = PrfaasKVReceiver(pair["dm"], pair["addr"], room)
    receiver2.init(0)
    receiver2.send_metadata(dst, 5, [np.array([4], np.int32), np.array([6], np.int32)], decode_prefix_len=8)
    _wait(lambda: sender2.poll() == KVPoll.WaitingForInput)
    assert sender2.pop_decode_prefix_len() == 8
    want = [b[src].copy() for b in p.kv]
    sender2.init(4, 3)
    sender2.send(src, state_indices=[np.array([1], np.int32), np.array([2], np.int32)])
    assert _poll_until_final(sender2, receiver2) == [KVPoll.Success, KVPoll.Success]
    for b, w in zip(d.kv, want):
        np.testing.assert_array_equal(b[dst], w)
    sender.abort()
    receiver.abort()


def _prfaas_threads() -> set[str]:
    import threading

    return {t.name for t in threading.enumerate() if t.name.startswith("prfaas-")}


def test_role_switch_through_sglangs_own_teardown(sgl: Any) -> None:
    """SGLang's ``/pd_role_switch`` path (``disaggregation/role_switch.py``) on an idle pair:
    its precondition check accepts the backend, its ``teardown_disaggregation`` releases both
    managers (no thread of theirs left), and managers of the swapped roles, built in the same
    process over the same pools, move a request bit-exact the other way."""
    from types import SimpleNamespace

    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.role_switch import _reject_reason, teardown_disaggregation
    from sglang.srt.disaggregation.utils import DisaggregationMode

    from prfaas_plugin.engines.sglang import conn

    before = _prfaas_threads()
    a_pool, b_pool = Pool(11), Pool(12)
    pm = conn.PrfaasKVManager(a_pool.kv_args(), DisaggregationMode.PREFILL, sgl["args"], False)
    dm = conn.PrfaasKVManager(b_pool.kv_args(), DisaggregationMode.DECODE, sgl["args"], False)
    assert _prfaas_threads() - before, "the managers run threads of their own"

    def scheduler(mode: Any, km: Any) -> Any:  # the fields role_switch.py reads, nothing else
        return SimpleNamespace(
            server_args=SimpleNamespace(enable_pd_role_switch=True),
            disaggregation_mode=mode,
            _pd_role_switch_unhealthy=False,
            _pd_role_switch_in_progress=False,
            disable_radix_cache=True,
            disagg_prefill_bootstrap_queue=SimpleNamespace(kv_manager=km)
            if mode == DisaggregationMode.PREFILL
            else None,
            disagg_decode_prealloc_queue=SimpleNamespace(kv_manager=km) if mode == DisaggregationMode.DECODE else None,
        )

    s_p, s_d = scheduler(DisaggregationMode.PREFILL, pm), scheduler(DisaggregationMode.DECODE, dm)
    assert _reject_reason(s_p, "decode") is None
    assert _reject_reason(s_d, "prefill") is None
    teardown_disaggregation(s_p)
    teardown_disaggregation(s_d)
    _wait(lambda: not (_prfaas_threads() - before), 10, "the torn-down managers' threads to exit")

    pm2 = conn.PrfaasKVManager(b_pool.kv_args(), DisaggregationMode.PREFILL, sgl["args"], False)
    dm2 = conn.PrfaasKVManager(a_pool.kv_args(), DisaggregationMode.DECODE, sgl["args"], False)
    try:
        assert dm2.try_ensure_parallel_info(sgl["addr"])
        pair = {"pm": pm2, "dm": dm2, "addr": sgl["addr"]}
        src, dst = np.array([9, 2, 30], np.int32), np.array([1, 44, 17], np.int32)
        want = [b[src].copy() for b in b_pool.kv]
        sender, receiver, _ = _start(pair, dst, 1, [np.array([2], np.int32), np.array([3], np.int32)])
        _wait(lambda: sender.poll() == KVPoll.WaitingForInput, what="prefill WaitingForInput")
        sender.init(3, 0)
        sender.send(src, state_indices=[np.array([0], np.int32), np.array([1], np.int32)])
        assert _poll_until_final(sender, receiver) == [KVPoll.Success, KVPoll.Success]
        for b, w in zip(a_pool.kv, want):
            np.testing.assert_array_equal(b[dst], w)
    finally:
        pm2.close()
        dm2.close()
