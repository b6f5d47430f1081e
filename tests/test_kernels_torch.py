"""The torch (CPU) path of prfaas_plugin.kernels against a naive indexing reference."""

from __future__ import annotations

import pytest
import torch

from prfaas_plugin.kernels import (
    CacheGroup,
    PagedLayout,
    pack,
    packed_nbytes,
    unpack,
    window_block_ids,
    window_block_range,
)
from tests.kernels_helpers import (
    FAMILIES,
    PACK_IDS,
    UNPACK_DST,
    UNPACK_SRC,
    assert_fp8_within_bound,
    blocks_view,
    head_scales,
    like_group,
    make_group,
    reference_pack,
    reference_unpack,
)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pack_matches_reference_and_fills_poisoned_buffer(name: str) -> None:
    group = make_group(name)
    expected = reference_pack(group, PACK_IDS)
    assert expected.numel() == packed_nbytes(group, len(PACK_IDS))
    assert bool(expected.float().abs().sum() > 0)  # random data, never zeros
    for poison in (0xA5, 0x5A):
        out = torch.full((expected.numel() + 8,), poison, dtype=torch.uint8)
        ret = pack(group, PACK_IDS, out=out)
        assert ret is out
        assert torch.equal(out[: expected.numel()], expected)
        assert bool((out[expected.numel() :] == poison).all())  # nothing written past the end


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_unpack_scatters_into_other_ids_and_nothing_else(name: str) -> None:
    src = make_group(name, seed=1)
    dst = like_group(src, seed=2)
    expected = reference_unpack(src, UNPACK_SRC, dst, UNPACK_DST)
    unpack(pack(src, UNPACK_SRC), dst, UNPACK_DST)
    for e, t in zip(expected, dst.caches):
        assert torch.equal(blocks_view(t, dst.layout), e)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[2]])
def test_fp8_round_trip_within_bound(name: str) -> None:
    src = make_group(name, seed=3)
    dst = like_group(src, seed=4)
    ids = UNPACK_SRC
    buf = pack(src, ids, fp8=True)
    assert buf.numel() == packed_nbytes(src, len(ids), fp8=True) < packed_nbytes(src, len(ids))
    unpack(buf, dst, UNPACK_DST, fp8=True)
    lay = src.layout
    pre, heads, post = lay.head_split
    scale = head_scales(src, ids)
    orig = torch.stack([blocks_view(t, lay)[o, b] for t in src.caches for o in range(lay.num_outer) for b in ids])
    got = torch.stack([blocks_view(t, lay)[o, b] for t in dst.caches for o in range(lay.num_outer) for b in UNPACK_DST])
    shape = (orig.shape[0], pre, heads, post)
    rel = assert_fp8_within_bound(orig.reshape(shape), got.reshape(shape), scale[:, None, :, None])
    assert 0 < rel < 2.0**-4


def test_fp8_refused_for_states_unless_forced() -> None:
    group = make_group("gdn_temporal")
    with pytest.raises(ValueError, match="lossless"):
        pack(group, [1, 2], fp8=True)
    buf = pack(group, [1, 2], fp8=True, lossy_states=True)
    assert buf.numel() == packed_nbytes(group, 2, fp8=True)


def test_fp8_all_zero_head_round_trips_to_zero() -> None:
    caches = [torch.zeros(2, 4, 4, 2, 8, dtype=torch.bfloat16)]
    caches[0][1, 2].normal_()
    group = CacheGroup.vllm_attention_gpu(caches)
    dst = CacheGroup.vllm_attention_gpu([torch.full_like(caches[0], 7.0)])
    unpack(pack(group, [0, 2], fp8=True), dst, [0, 2], fp8=True)
    assert bool((dst.caches[0][0, 0] == 0).all()) and bool((dst.caches[0][:, 2] != 7).all())


def test_bad_inputs_are_refused() -> None:
    group = make_group("mla")
    with pytest.raises(ValueError, match="out of range"):
        pack(group, [0, 10])
    with pytest.raises(ValueError, match="out of range"):
        pack(group, [-1])
    with pytest.raises(ValueError, match="bytes"):
        pack(group, [0, 1], out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack(group, [0, 1], out=torch.empty(10**5, dtype=torch.float32))
    with pytest.raises(ValueError, match="does not match"):
        CacheGroup.mla([group.caches[0], torch.zeros(3, 4, 36, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="contiguous"):
        t = group.caches[0].transpose(1, 2)  # rows no longer one run of bytes
        CacheGroup([t], PagedLayout.of(t, 0))
    with pytest.raises(ValueError, match="K/V"):
        CacheGroup.vllm_attention_gpu([torch.zeros(3, 4, 2, 2, 2)])
    with pytest.raises(ValueError, match="K and V"):
        CacheGroup.vllm_attention_cpu([torch.zeros(3, 4, 2, 7)])
    with pytest.raises(ValueError, match="backend"):
        pack(group, [0], backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds"):
        unpack(torch.empty(5, dtype=torch.uint8), group, [0])


def test_empty_request_is_a_no_op() -> None:
    group = make_group("attn_gpu")
    assert pack(group, []).numel() == 0
    unpack(torch.empty(0, dtype=torch.uint8), group, [])


def test_window_cuts_a_block_in_the_middle() -> None:
    # 100 tokens, 16-token blocks (7 blocks), window 40: tokens 60..99 live in blocks 3..6;
    # block 3 holds tokens 48..63, of which only 60..63 are in the window, so it is sent whole.
    table = [11, 4, 9, 2, 7, 0, 5]
    w = window_block_ids(table, num_tokens=100, window=40, block_size=16)
    assert w.first == 3 and w.block_ids == [2, 7, 0, 5]
    # a window aligned to blocks sends no extra block; one longer than the request sends all
    assert window_block_ids(table, 96, 32, 16) == (4, [7, 0])
    assert window_block_ids(table, 100, 4096, 16) == (0, table)
    assert window_block_range(0, 8, 16) == range(0, 0)
    # never more than vLLM/NIXL's cdiv(window, block_size) + 1 blocks
    for n in range(1, 113):
        for win in (1, 15, 16, 17, 40):
            assert len(window_block_range(n, win, 16)) <= -(-win // 16) + 1
    with pytest.raises(ValueError, match="block table"):
        window_block_ids(table[:3], 100, 40, 16)
    with pytest.raises(ValueError):
        window_block_range(10, 0, 16)


def test_window_blocks_pack_across_layers() -> None:
    group = make_group("attn_gpu", seed=5)
    table = [9, 3, 6, 1, 8]
    w = window_block_ids(table, num_tokens=70, window=20, block_size=16)  # tokens 50..69 -> blocks 3, 4
    assert w.block_ids == [1, 8]
    assert torch.equal(pack(group, w.block_ids), reference_pack(group, [1, 8]))


@pytest.mark.parametrize("shift", [0, 1, 2, 4])
def test_word_size_follows_each_buffer_with_the_caches_alignment_kept(shift: int) -> None:
    """The caches' alignment is computed once per group and kept; the buffer's pointer still
    decides each call, so a buffer at an odd offset after an aligned one packs bit-exactly."""
    g = torch.Generator().manual_seed(3)
    make, ctor, _ = FAMILIES["attn_gpu"]
    group = ctor(make(g, 10))
    ids = PACK_IDS
    n = packed_nbytes(group, len(ids))
    aligned = pack(group, ids)
    assert group.word_bytes(aligned) == 8
    backing = torch.full((n + 8,), 0xA5, dtype=torch.uint8)
    out = backing[shift : shift + n]
    assert group.word_bytes(out) == {0: 8, 1: 1, 2: 2, 4: 4}[shift]
    pack(group, ids, out=out)
    assert torch.equal(out, aligned)
    dst = ctor([torch.zeros_like(t) for t in group.caches])
    unpack(out, dst, list(range(len(ids))))
    ref = ctor([torch.zeros_like(t) for t in group.caches])
    unpack(aligned, ref, list(range(len(ids))))
    assert all(torch.equal(a, b) for a, b in zip(dst.caches, ref.caches))
