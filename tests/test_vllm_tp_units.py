"""Heterogeneous TP routing (``engines/vllm/tp.py`` + ``packing``), bit-exact on CPU tensors.

For each layout a whole-model tensor per layer part is sharded the way vLLM shards it (written
out here per layer kind, independently of ``tp.py``: GQA heads with replication below TP, GDN's
``[q | k | v]`` conv channels and value-head recurrent state, MLA's replicated latent). The
prefill ranks' shards are packed, gathered per decode rank, "sent" as raw bytes, scattered into
decode-rank caches at other block ids, and compared with the whole tensor sharded for that
decode rank: every byte, and nothing more than the decode rank needs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prfaas_plugin.engines.vllm import packing, tp
from prfaas_plugin.engines.vllm.tp import PartSplit, Segment, TPLayoutError

PACKER = packing.Packer()  # the connector's pack/unpack (kernels/) on CPU tensors

NB, BS = 12, 4  # cache blocks, block size


# -- vLLM's sharding, written out per layer kind (the reference the routing is checked against) ---
def kv_heads_of(rank: int, tp_size: int, heads: int) -> list[int]:
    """vLLM's KV-head split: contiguous heads per rank, or one replicated head when heads < TP."""
    if heads >= tp_size:
        n = heads // tp_size
        return list(range(rank * n, (rank + 1) * n))
    return [rank * heads // tp_size]


def shard_attention(whole: torch.Tensor, head_dim: int, rank: int, tp_size: int) -> torch.Tensor:
    idx = torch.tensor(kv_heads_of(rank, tp_size, whole.shape[head_dim]))
    return whole.index_select(head_dim, idx).contiguous()


def shard_gdn_conv(whole: torch.Tensor, dim: int, key_dim: int, value_dim: int, rank: int, tp_size: int):
    """ColumnParallel split of each of q, k, v channels, concatenated per rank."""
    q, k, v = whole.split([key_dim, key_dim, value_dim], dim=dim)
    parts = [x.chunk(tp_size, dim=dim)[rank] for x in (q, k, v)]
    return torch.cat(parts, dim=dim).contiguous()


def shard_even(whole: torch.Tensor, dim: int, rank: int, tp_size: int) -> torch.Tensor:
    return whole.chunk(tp_size, dim=dim)[rank].contiguous()


@dataclass
class Part:
    name: str
    whole: torch.Tensor  # block dim 0 or 1, whole model
    block_dim: int
    split: PartSplit
    shard: object  # (whole, rank, tp) -> rank tensor


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


def qwen3_next_like() -> list[Part]:
    """GQA full attention with 2 KV heads (replicated past TP 2) + GDN: conv state [q|k|v]
    (8 key heads x 4, 8 value heads x 4, kernel 4, channel dim last), recurrent state per value head."""
    g = _gen(1)
    nk, nv, dk, dv, kernel = 8, 8, 4, 4, 4
    attn = torch.randn(2, NB, BS, 2, 8, generator=g).to(torch.bfloat16)  # [kv, blocks, tokens, heads, dim]
    conv = torch.randn(NB, kernel - 1, 2 * nk * dk + nv * dv, generator=g)
    rec = torch.randn(NB, nv, dv, dk, generator=g)
    return [
        Part("attn", attn, 1, PartSplit(3, (Segment(2),)), lambda w, r, t: shard_attention(w, 3, r, t)),
        Part(
            "gdn.conv",
            conv,
            0,
            PartSplit(2, (Segment(nk * dk), Segment(nk * dk), Segment(nv * dv))),
            lambda w, r, t: shard_gdn_conv(w, 2, nk * dk, nv * dv, r, t),
        ),
        Part("gdn.rec", rec, 0, PartSplit(1, (Segment(nv),)), lambda w, r, t: shard_even(w, 1, r, t)),
    ]


def deepseek_like() -> list[Part]:
    """MLA: one latent (kv_lora_rank + rope dim) per token, the same on every rank."""
    lat = torch.randn(NB, BS, 12, generator=_gen(2)).to(torch.float16)
    return [Part("mla", lat, 0, PartSplit(), lambda w, r, t: w.clone())]


def gemma3_like() -> list[Part]:
    """Sliding-window and full attention layers, 8 KV heads, [blocks, kv, heads, tokens, dim]."""
    g = _gen(3)
    swa = torch.randn(NB, 2, 8, BS, 4, generator=g).to(torch.float16)
    full = torch.randn(NB, 2, 8, BS, 4, generator=g).to(torch.float16)
    return [
        Part(n, x, 0, PartSplit(2, (Segment(8),)), lambda w, r, t: shard_attention(w, 2, r, t))
        for n, x in (("swa", swa), ("full", full))
    ]


LAYOUTS = {"qwen3next": qwen3_next_like, "deepseek": deepseek_like, "gemma3": gemma3_like}
PAIRS = [(2, 1), (1, 2), (4, 8), (8, 4), (2, 2), (1, 4)]


def _move(part: Part, a: int, b: int, src_blocks: list[int], dst_blocks: list[int], skip: int = 0):
    """Route one part from every prefill rank of TP a into fresh decode-rank caches of TP b.
    Returns (decode caches, bytes each decode rank received)."""
    p_caches = [part.shard(part.whole, r, a) for r in range(a)]
    d_caches, received = [], []
    for d in range(b):
        cache = torch.zeros_like(part.shard(part.whole, d, b))
        got = 0
        for p, slices in tp.route(part.split, a, b, d).items():
            assert p in tp.feeders(d, a, b) and d in tp.fed_by(p, a, b)
            packed = PACKER.pack(p_caches[p], part.block_dim, src_blocks)
            if tp.sends_whole(slices, part.split, a, p):
                piece = packed
            else:
                piece = packing.gather_rows(packed, part.split.dim, tp.gather_spec(slices))
            wire = piece.contiguous().view(-1).view(torch.uint8).clone()  # what crosses: raw bytes
            got += wire.numel()
            if tp.sends_whole(slices, part.split, a, p) and part.split.replicated:
                PACKER.unpack(cache, part.block_dim, dst_blocks, wire, skip)
            else:
                rows = (part.split.dim, tp.scatter_spec(slices))
                PACKER.unpack(cache, part.block_dim, dst_blocks, wire, skip, rows)
        d_caches.append(cache)
        received.append(got)
    return d_caches, received


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"P{a}-D{b}" for a, b in PAIRS])
def test_split_merge_is_bit_exact(layout, a, b):
    src_blocks, dst_blocks = [7, 2, 9], [1, 10, 4]
    for part in LAYOUTS[layout]():
        d_caches, received = _move(part, a, b, src_blocks, dst_blocks)
        for d, cache in enumerate(d_caches):
            want = part.shard(part.whole, d, b)
            bd = part.block_dim
            got = cache.index_select(bd, torch.tensor(dst_blocks))
            ref = want.index_select(bd, torch.tensor(src_blocks))
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), (layout, part.name, a, b, d)
            untouched = [i for i in range(NB) if i not in dst_blocks]
            assert not cache.index_select(bd, torch.tensor(untouched)).any(), "wrote outside the request's blocks"
            # exactly the bytes this decode rank needs: its share of the request's blocks, no more
            assert received[d] == ref.numel() * ref.element_size(), (part.name, d, received[d])


def test_round_trip_tp2_to_tp1_and_back():
    """P TP2 -> D TP1 -> (as prefill) TP2 gives back each rank's original shard for every layout."""
    blocks = [3, 0, 5, 11]
    for make in LAYOUTS.values():
        for part in make():
            merged, _ = _move(part, 2, 1, blocks, blocks)
            whole = part.whole.clone()
            whole.index_copy_(
                part.block_dim, torch.tensor(blocks), merged[0].index_select(part.block_dim, torch.tensor(blocks))
            )
            back = Part(part.name, whole, part.block_dim, part.split, part.shard)
            split_again, _ = _move(back, 1, 2, blocks, blocks)
            for r in range(2):
                ref = part.shard(part.whole, r, 2).index_select(part.block_dim, torch.tensor(blocks))
                got = split_again[r].index_select(part.block_dim, torch.tensor(blocks))
                assert torch.equal(got, ref), (part.name, r)


def test_prefix_blocks_held_by_decode_are_left_alone():
    part = gemma3_like()[0]
    d_caches, _ = _move(part, 4, 2, [0, 1, 2], [5, 6, 7], skip=2)
    for d, cache in enumerate(d_caches):
        assert not cache[5].any() and not cache[6].any()
        assert torch.equal(cache[7], part.shard(part.whole, d, 2)[2])


def test_replicated_heads_come_from_one_prefill_rank_each():
    """2 KV heads over P TP8 -> D TP4: each decode rank takes its one head from exactly one of its
    two feeders, so no head crosses twice."""
    split = PartSplit(3, (Segment(2),))
    for d in range(4):
        r = tp.route(split, 8, 4, d)
        assert len(r) == 1 and next(iter(r)) in tp.feeders(d, 8, 4)
        assert tp.piece_rows(next(iter(r.values()))) == 1


def test_gdn_conv_slices_interleave_q_k_v():
    """P TP2 -> D TP1: the decode rank's [q|k|v] takes q0 q1 k0 k1 v0 v1 from two ranks."""
    split = PartSplit(2, (Segment(8), Segment(8), Segment(16)))
    r = tp.route(split, 2, 1, 0)
    assert r == {
        0: (tp.Slice(0, 0, 4), tp.Slice(4, 8, 4), tp.Slice(8, 16, 8)),
        1: (tp.Slice(0, 4, 4), tp.Slice(4, 12, 4), tp.Slice(8, 24, 8)),
    }


def test_tp_3_to_2_is_refused_naming_both_sizes():
    with pytest.raises(TPLayoutError, match=r"prefill TP 3 and decode TP 2"):
        tp.check_tp_pair(3, 2)
    with pytest.raises(TPLayoutError, match=r"prefill TP 2 and decode TP 3"):
        tp.route(PartSplit(0, (Segment(6),)), 2, 3, 0)
    with pytest.raises(TPLayoutError, match="do not split"):
        tp.held_heads(0, 4, 6)


# -- the worker halves, wired: P and D ranks of different TP sizes on the loopback fabric ---------
GDN = {"nk": 4, "nv": 4, "dk": 2, "dv": 2}
ATTN_HEADS = 2


def _whole_caches(seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    conv_dim = 2 * GDN["nk"] * GDN["dk"] + GDN["nv"] * GDN["dv"]
    return {
        "attn": torch.randn(2, NB, BS, ATTN_HEADS, 8, generator=g).to(torch.float16),
        "gdn.conv": torch.randn(NB, 3, conv_dim, generator=g),
        "gdn.rec": torch.randn(NB, GDN["nv"], GDN["dv"], GDN["dk"], generator=g),
    }


def _rank_caches(whole: dict[str, torch.Tensor], rank: int, tp_size: int) -> dict[str, object]:
    kd, vd = GDN["nk"] * GDN["dk"], GDN["nv"] * GDN["dv"]
    return {
        "attn": shard_attention(whole["attn"], 3, rank, tp_size),
        "gdn": [
            shard_gdn_conv(whole["gdn.conv"], 2, kd, vd, rank, tp_size),
            shard_even(whole["gdn.rec"], 1, rank, tp_size),
        ],
    }


def _rank_worker(engine_id: str, rank: int, tp_size: int, peer_tp: int, producer: bool, caches, port: int):
    from types import SimpleNamespace

    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    from prfaas_plugin.engines.vllm.options import Options
    from prfaas_plugin.engines.vllm.worker import WorkerSide

    attn = FullAttentionSpec(
        block_size=BS, num_kv_heads=len(kv_heads_of(rank, tp_size, ATTN_HEADS)), head_size=8, dtype=torch.float16
    )
    gdn = caches["gdn"]
    state = MambaSpec(
        block_size=BS,
        shapes=(tuple(gdn[0].shape[1:]), tuple(gdn[1].shape[1:])),
        dtypes=(torch.float32, torch.float32),
        mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
    )
    kv_cache_config = SimpleNamespace(
        num_blocks=NB,
        kv_cache_groups=[
            SimpleNamespace(kv_cache_spec=attn, layer_names=["attn"]),
            SimpleNamespace(kv_cache_spec=state, layer_names=["gdn"]),
        ],
    )
    hf = SimpleNamespace(
        linear_num_key_heads=GDN["nk"],
        linear_num_value_heads=GDN["nv"],
        linear_key_head_dim=GDN["dk"],
        linear_value_head_dim=GDN["dv"],
    )
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(rank=rank, tensor_parallel_size=tp_size),
        model_config=SimpleNamespace(model="/m/tiny", get_total_num_kv_heads=lambda: ATTN_HEADS, hf_text_config=hf),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        kv_transfer_config=SimpleNamespace(engine_id=engine_id),
    )
    opts = Options(listen=f"127.0.0.1:{port}", peer_tp_size=peer_tp)
    w = WorkerSide(vllm_config, kv_cache_config, opts, producer=producer, consumer=not producer)
    w.register_kv_caches(caches)
    return w


def _transfer(a: int, b: int, port: int, p_peer: int | None = None, d_peer: int | None = None, deadline_s=10.0):
    """One request of 10 tokens from P (TP a) to D (TP b): D's failed ids, P's whole-model caches,
    D's rank caches."""
    import time

    from prfaas_plugin.engines.vllm.meta import Transfer

    token = "session-token-0123456789abcdef"
    p_whole, d_whole = _whole_caches(1), _whole_caches(2)
    p_caches = [_rank_caches(p_whole, r, a) for r in range(a)]
    d_caches = [_rank_caches(d_whole, r, b) for r in range(b)]
    prods = [_rank_worker("p", r, a, p_peer or b, True, p_caches[r], port) for r in range(a)]
    cons = [_rank_worker("d", r, b, d_peer or a, False, d_caches[r], port) for r in range(b)]
    src, dst = ([5, 2, 9], [0, 0, 7]), ([1, 7, 3], [0, 0, 4])
    try:
        for c in cons:
            c.meta.loads = [Transfer("r1", "xfer-1", token, deadline_s, 10, dst)]
            c.start_load_kv()
        for p in prods:
            p.meta.sends = [Transfer("r1", "xfer-1", token, deadline_s, 10, src, endpoint=f"127.0.0.1:{port}")]
            p.save_kv_layer("attn")
            p.wait_for_save()
        failed: set[str] = set()
        end = time.monotonic() + deadline_s + 5
        pending = set(range(b))
        while pending and time.monotonic() < end:
            for r in list(pending):
                _, recving, f = cons[r].transfer_results(set())
                if recving:
                    pending.discard(r)
                    failed |= f
            time.sleep(0.01)
        assert not pending, "a decode rank never reported its load"
        return failed, p_whole, d_caches
    finally:
        for w in prods + cons:
            w.shutdown()


PAIRS_WIRED = [(2, 1), (1, 2), (4, 2), (2, 4)]


@pytest.mark.parametrize(("a", "b"), PAIRS_WIRED, ids=[f"P{a}-D{b}" for a, b in PAIRS_WIRED])
def test_worker_halves_route_across_tp_sizes(fabric, a, b):
    failed, p_whole, d_caches = _transfer(a, b, 17300 + 10 * a + b)
    assert not failed
    for r in range(b):
        want = _rank_caches(p_whole, r, b)
        assert torch.equal(d_caches[r]["attn"][:, [1, 7, 3]], want["attn"][:, [5, 2, 9]])
        for i in range(2):  # the state block only: GDN state slot 7 -> 4
            assert torch.equal(d_caches[r]["gdn"][i][4], want["gdn"][i][7])
    # each pair its own session: decode rank d hears from exactly its feeders
    opened = sorted(m.request_id for m in fabric.opened)
    assert opened == sorted(f"xfer-1.p{p}" for d in range(b) for p in tp.feeders(d, a, b))


def test_misconfigured_peer_tp_is_refused_at_the_handshake(fabric):
    """P TP2 feeding D TP1, but D told its prefill runs TP4: P's sessions are refused at the
    handshake, the message naming both sides' TP sizes, and D recomputes at once."""
    import logging

    class Grab(logging.Handler):
        lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    log, grab = logging.getLogger("vllm.prfaas"), Grab()
    log.addHandler(grab)
    try:
        failed, _, _ = _transfer(2, 1, 17390, p_peer=1, d_peer=4, deadline_s=5)
    finally:
        log.removeHandler(grab)
    assert failed == {"r1"}
    refusals = [m for m in grab.lines if "FingerprintMismatch" in m]
    assert refusals and all("prefill TP 4 -> decode TP 1" in m and "prefill TP 2 -> decode TP 1" in m for m in refusals)
    assert not [m for m in grab.lines if "TransferTimeout" in m], "the refusal should fail the load at once"


def test_tp_3_to_2_refused_at_startup(fabric):
    with pytest.raises(TPLayoutError, match=r"prefill TP 3 and decode TP 2"):
        whole = _whole_caches(1)
        _rank_worker("p", 0, 3, 2, True, _rank_caches(whole, 0, 1), 17395)


def test_gdn_byte_page_split_matches_vllm_rank_states():
    """vLLM 0.32 registers a GDN layer as one int8 view of each block's page: conv state
    [position][q|k|v] (bf16) then the recurrent state (fp32). The split read from the spec routes
    it P TP2 -> D TP1 and P TP1 -> D TP2 so each decode rank's page holds exactly the states vLLM
    would have computed for that rank."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import MambaSpec

    from prfaas_plugin.engines.vllm import hetero

    nk = nv = 2
    dk = dv = 8
    kd, vd = nk * dk, nv * dv
    g = _gen(7)
    conv = torch.randn(NB, 3, 2 * kd + vd, generator=g).to(torch.bfloat16)
    rec = torch.randn(NB, nv, dv, dk, generator=g)
    hf = SimpleNamespace(
        linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=dk, linear_value_head_dim=dv
    )
    model_config = SimpleNamespace(hf_text_config=hf)

    def page(rank: int, t: int) -> torch.Tensor:
        c = shard_gdn_conv(conv, 2, kd, vd, rank, t)
        r = shard_even(rec, 1, rank, t)
        flat = torch.cat([c.reshape(NB, -1).view(torch.uint8), r.reshape(NB, -1).view(torch.uint8)], dim=1)
        return flat.view(torch.int8).view(NB, 1, 1, -1).clone()

    def split(t: int) -> PartSplit:
        spec = MambaSpec(
            block_size=BS,
            shapes=((3, (2 * kd + vd) // t), (nv // t, dv, dk)),
            dtypes=(torch.bfloat16, torch.float32),
            mamba_type=MambaAttentionBackendEnum.GDN_ATTN,
        )
        kvc = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["gdn"])])
        return hetero.part_splits(kvc, model_config, {"gdn": [(page(0, t), 0)]}, t)["gdn"][0]

    for a, b in ((2, 1), (1, 2), (1, 1)):
        sp = split(a)
        assert sp == split(b), "both sides must read the same whole-model split"
        part = Part("gdn", torch.empty(0), 0, sp, None)
        p_pages = [page(r, a) for r in range(a)]
        for d in range(b):
            cache = torch.zeros_like(page(d, b))
            for p, slices in tp.route(sp, a, b, d).items():
                piece = packing.gather_rows(PACKER.pack(p_pages[p], 0, [4]), sp.dim, tp.gather_spec(slices))
                PACKER.unpack(cache, 0, [9], piece.view(-1).view(torch.uint8), 0, (sp.dim, tp.scatter_spec(slices)))
            assert torch.equal(cache[9], page(d, b)[4]), (a, b, d, part.name)
