"""Shared fixtures for the kernels tests: random caches of every layout family and a naive
reference written with plain indexing (independent of kernels/torch_ops.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prfaas_plugin.kernels import CacheGroup, PagedLayout

# Odd, unsorted, repeated block ids (repeats are legal for pack only).
PACK_IDS = [5, 0, 9, 5, 2, 9, 1]
UNPACK_SRC = [6, 3, 0, 8, 2]
UNPACK_DST = [1, 7, 4, 0, 9]  # distinct destination ids, a different order


def _rand(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        # spread magnitudes over decades so fp8 scales and subnormals get exercised
        x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)
        return x.to(dtype)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int32).to(dtype)


def padded_pool_layers(num_layers: int, nb: int, page: int, pad: int, g: torch.Generator) -> list[torch.Tensor]:
    """Raw int8 state pages that are views into one shared pool with padded pages (what vLLM
    hands over with HMA): block stride > row, all layers in one allocation."""
    pool = _rand((nb, num_layers, page + pad), torch.int8, g)
    return [pool[:, i, :page] for i in range(num_layers)]


def mixed_stride_layers(nb: int, g: torch.Generator) -> list[torch.Tensor]:
    """Same shape, different block strides per layer (separately padded allocations)."""
    return [_rand((nb, 40 + pad), torch.bfloat16, g)[:, :40] for pad in (0, 8, 24)]


# name -> (make caches(generator, num_blocks), group constructor, fp8 allowed)
FAMILIES: dict[str, tuple[Callable[[torch.Generator, int], list[torch.Tensor]], Callable, bool]] = {
    "attn_gpu": (
        lambda g, nb: [_rand((2, nb, 4, 2, 8), torch.bfloat16, g) for _ in range(3)],
        CacheGroup.vllm_attention_gpu,
        True,
    ),
    "attn_cpu": (
        lambda g, nb: [_rand((nb, 3, 4, 16), torch.bfloat16, g) for _ in range(2)],
        CacheGroup.vllm_attention_cpu,
        True,
    ),
    # vLLM 0.32 KVCacheLayout.LBNHC seen physically: [NB, BS, H, 2*D], heads at row axis 1
    "attn_bnhc": (
        lambda g, nb: [_rand((nb, 4, 2, 16), torch.float16, g) for _ in range(2)],
        lambda c: CacheGroup(c, PagedLayout.of(c[0], 0, head_axis=1)),
        True,
    ),
    "mla": (lambda g, nb: [_rand((nb, 4, 36), torch.bfloat16, g) for _ in range(3)], CacheGroup.mla, True),
    # recurrent states, one slot per "block": shapes per family (small head counts)
    "gdn_temporal": (lambda g, nb: [_rand((nb, 2, 8, 8), torch.float32, g) for _ in range(2)], CacheGroup.state, False),
    "gdn_conv": (lambda g, nb: [_rand((nb, 48, 3), torch.bfloat16, g) for _ in range(2)], CacheGroup.state, False),
    "kda_temporal": (lambda g, nb: [_rand((nb, 2, 8, 8), torch.float32, g) for _ in range(2)], CacheGroup.state, False),
    "mamba2_ssm": (lambda g, nb: [_rand((nb, 2, 4, 16), torch.float32, g) for _ in range(2)], CacheGroup.state, False),
    "mamba2_conv": (lambda g, nb: [_rand((nb, 3, 40), torch.bfloat16, g) for _ in range(2)], CacheGroup.state, False),
    "lightning": (lambda g, nb: [_rand((nb, 2, 8, 8), torch.float32, g) for _ in range(2)], CacheGroup.state, False),
    # a row of 4101 fp32 words: more than one kernel tile (2048) and a partial last tile
    "big_row_state": (lambda g, nb: [_rand((nb, 4101), torch.float32, g) for _ in range(2)], CacheGroup.state, False),
    "mixed_strides": (lambda g, nb: mixed_stride_layers(nb, g), lambda c: CacheGroup(c, PagedLayout.of(c[0], 0)), True),
    "raw_pages_padded": (lambda g, nb: padded_pool_layers(3, nb, 52, 12, g), CacheGroup.state, False),
    # state pages as big as real ones (>= 64 KiB rows): the CPU path copies them row by row
    "raw_pages_64k": (lambda g, nb: padded_pool_layers(2, nb, 65_600, 64, g), CacheGroup.state, False),
}

NUM_BLOCKS = 10


def make_group(name: str, seed: int = 0) -> CacheGroup:
    g = torch.Generator().manual_seed(seed)
    make, ctor, _ = FAMILIES[name]
    return ctor(make(g, NUM_BLOCKS))


def like_group(group: CacheGroup, seed: int) -> CacheGroup:
    """A destination group of the same layout filled with different random data."""
    g = torch.Generator().manual_seed(seed)
    caches = [_rand(tuple(t.shape), t.dtype, g) for t in group.caches]
    return CacheGroup(
        caches, PagedLayout.of(caches[0], group.layout.block_dim, group.layout.head_axis, group.layout.lossless)
    )


def blocks_view(t: torch.Tensor, lay: PagedLayout) -> torch.Tensor:
    """``[outer, num_blocks, row_elems]`` copy of a layer (reference only)."""
    return t.reshape(lay.num_outer, lay.num_blocks, lay.row_elems)


def reference_pack(group: CacheGroup, ids: list[int]) -> torch.Tensor:
    lay = group.layout
    rows = [blocks_view(t, lay)[o, b] for t in group.caches for o in range(lay.num_outer) for b in ids]
    flat = torch.stack(rows).contiguous()
    return flat.view(torch.uint8).reshape(-1)


def reference_unpack(src: CacheGroup, src_ids: list[int], dst: CacheGroup, dst_ids: list[int]) -> list[torch.Tensor]:
    lay = dst.layout
    out = []
    for ts, td in zip(src.caches, dst.caches):
        e = blocks_view(td, lay).clone()
        s = blocks_view(ts, lay)
        for a, b in zip(src_ids, dst_ids):
            e[:, b] = s[:, a]
        out.append(e)
    return out


def head_scales(group: CacheGroup, ids: list[int]) -> torch.Tensor:
    """Expected scale per ``[row, head]``: amax / 448 (1 for an all-zero head)."""
    lay = group.layout
    pre, heads, post = lay.head_split
    rows = [blocks_view(t, lay)[o, b] for t in group.caches for o in range(lay.num_outer) for b in ids]
    x = torch.stack(rows).float().reshape(len(rows), pre, heads, post)
    s = x.abs().amax(dim=(1, 3)) / 448.0
    return torch.where(s == 0, torch.ones_like(s), s)


def assert_fp8_within_bound(orig: torch.Tensor, got: torch.Tensor, scale: torch.Tensor) -> float:
    """e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a
    subnormal by half a step (2^-10 of the scale); writing back into bf16 adds 2^-8 of the
    result. Returns the largest error relative to the head's amax (for the report)."""
    o, r = orig.float(), got.float()
    bound = o.abs() * 2.0**-4 + scale * 2.0**-10 + r.abs() * 2.0**-8
    err = (o - r).abs()
    assert bool((err <= bound).all()), f"fp8 error {float((err - bound).max())} above bound"
    return float((err / (scale * 448.0)).max())
