"""Triton kernels: one launch moves every row of every layer of a cache group.

Each program handles one buffer row (one block of one layer and K/V half); the row's cache
address comes from a descriptor table of word offsets relative to layer 0 (see plan.py), so
layers that live in separate allocations still need only one launch. Importing this module
imports triton; on a CPU-only machine set ``TRITON_INTERPRET=1`` *before* that import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .layout import PagedLayout
from .plan import FP8_MAX, PackGeometry, row_offsets, word_dtype

_MAX_TILE = 2048


@triton.jit
def _f32_to_e4m3_bits(x):
    # Round-to-nearest-even float32 -> e4m3fn code (|x| <= 448 already), in integer ops so
    # the GPU and the CPU interpreter give the same bits as torch's cast (the interpreter's
    # own fp8 cast drops mantissa carries).
    bits = x.to(tl.int32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    a = bits & 0x7FFFFFFF
    # normal range (|x| >= 2^-6): round the 23-bit mantissa to 3 bits; a carry bumps the exponent
    rounded = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    normal = rounded - (120 << 3)
    # subnormal range: multiples of 2^-9, rounded half to even
    y = (a.to(tl.float32, bitcast=True)) * 512.0
    fl = y.to(tl.int32)
    frac = y - fl.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))
    sub = fl + up.to(tl.int32)
    code = tl.where(a >= 0x3C800000, normal, sub)
    return (sign | code).to(tl.uint8)


@triton.jit
def _e4m3_bits_to_f32(c):
    c = c.to(tl.int32)
    e = (c >> 3) & 15
    m = c & 7
    normal = ((e + 120) << 23 | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((c & 0x80) != 0, -val, val)


@triton.jit
def _gather_rows(base, offsets, out, row_words, TILE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    src = base + tl.load(offsets + r)
    dst = out + r * row_words
    for start in range(0, row_words, TILE):
        cols = start + tl.arange(0, TILE)
        m = cols < row_words
        tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)


@triton.jit
def _scatter_rows(buf, base, offsets, row_words, TILE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    src = buf + r * row_words
    dst = base + tl.load(offsets + r)
    for start in range(0, row_words, TILE):
        cols = start + tl.arange(0, TILE)
        m = cols < row_words
        tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)


@triton.jit
def _quant_rows(
    base, offsets, payload, scales, heads, post, head_elems, row_elems, FP8MAX: tl.constexpr, TILE: tl.constexpr
):
    # One program per (row, head): pass 1 finds the head's amax, pass 2 writes e4m3 values.
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    src = base + tl.load(offsets + r)
    amax = tl.zeros((TILE,), dtype=tl.float32)
    for start in range(0, head_elems, TILE):
        e = start + tl.arange(0, TILE)
        m = e < head_elems
        a = (e // post) * heads * post + h * post + e % post
        x = tl.load(src + a, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.max(amax, axis=0) / FP8MAX
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(scales + r * heads + h, scale)
    for start in range(0, head_elems, TILE):
        e = start + tl.arange(0, TILE)
        m = e < head_elems
        a = (e // post) * heads * post + h * post + e % post
        x = tl.load(src + a, mask=m, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8MAX), FP8MAX)
        tl.store(payload + r * row_elems + a, _f32_to_e4m3_bits(q), mask=m)


@triton.jit
def _f32_to_bf16_bits(v):
    # Round-to-nearest-even float32 -> bfloat16 in integer ops (the interpreter's cast
    # truncates; the GPU's rounds to nearest even, like torch). Inputs are finite here.
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def _dequant_rows(
    payload, scales, base, offsets, heads, post, head_elems, row_elems, BF16: tl.constexpr, TILE: tl.constexpr
):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    dst = base + tl.load(offsets + r)
    scale = tl.load(scales + r * heads + h)
    for start in range(0, head_elems, TILE):
        e = start + tl.arange(0, TILE)
        m = e < head_elems
        a = (e // post) * heads * post + h * post + e % post
        q = _e4m3_bits_to_f32(tl.load(payload + r * row_elems + a, mask=m, other=0))
        v = q * scale
        if BF16:
            tl.store(dst + a, _f32_to_bf16_bits(v), mask=m)
        else:
            tl.store(dst + a, v.to(dst.dtype.element_ty), mask=m)


def _tile(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), _MAX_TILE)


def _base_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor of ``dtype`` starting at ``t``'s first byte: the kernels' base
    pointer (every row address is base + a descriptor offset)."""
    storage = t.untyped_storage()
    isz = torch.empty((), dtype=dtype).element_size()
    v = torch.empty(0, dtype=dtype, device=t.device)
    return v.set_(storage, (t.data_ptr() - storage.data_ptr()) // isz, (1,), (1,))


def pack(
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    idx: torch.Tensor,
    out: torch.Tensor,
    geo: PackGeometry,
    wb: int,
) -> None:
    """``wb``: the word size the caches and ``out`` allow (``CacheGroup.word_bytes``)."""
    if geo.fp8:
        _pack_fp8(caches, layout, idx, out, geo)
        return
    offs = row_offsets(caches, layout, idx, wb)
    row_words = layout.row_bytes // wb
    dst = out[: geo.payload_bytes].view(word_dtype(wb))
    _gather_rows[(geo.num_rows,)](_base_view(caches[0], word_dtype(wb)), offs, dst, row_words, TILE=_tile(row_words))


def unpack(
    buf: torch.Tensor,
    caches: Sequence[torch.Tensor],
    layout: PagedLayout,
    idx: torch.Tensor,
    geo: PackGeometry,
    wb: int,
) -> None:
    """``wb``: the word size the caches and ``buf`` allow (``CacheGroup.word_bytes``)."""
    if geo.fp8:
        _unpack_fp8(buf, caches, layout, idx, geo)
        return
    offs = row_offsets(caches, layout, idx, wb)
    row_words = layout.row_bytes // wb
    src = buf[: geo.payload_bytes].view(word_dtype(wb))
    _scatter_rows[(geo.num_rows,)](src, _base_view(caches[0], word_dtype(wb)), offs, row_words, TILE=_tile(row_words))


def _fp8_args(caches, layout, idx, buf, geo):
    offs = row_offsets(caches, layout, idx, layout.itemsize)
    payload = buf[: geo.payload_bytes]
    scales = buf[geo.scales_offset : geo.nbytes].view(torch.float32)
    pre, heads, post = layout.head_split
    return offs, payload, scales, heads, post, pre * post


def _pack_fp8(caches, layout, idx, out, geo) -> None:
    offs, payload, scales, heads, post, head_elems = _fp8_args(caches, layout, idx, out, geo)
    _quant_rows[(geo.num_rows, heads)](
        _base_view(caches[0], layout.dtype),
        offs,
        payload,
        scales,
        heads,
        post,
        head_elems,
        layout.row_elems,
        FP8MAX=FP8_MAX,
        TILE=_tile(head_elems),
    )


def _unpack_fp8(buf, caches, layout, idx, geo) -> None:
    offs, payload, scales, heads, post, head_elems = _fp8_args(caches, layout, idx, buf, geo)
    bf16 = layout.dtype == torch.bfloat16
    _dequant_rows[(geo.num_rows, heads)](
        payload,
        scales,
        _base_view(caches[0], torch.int16 if bf16 else layout.dtype),
        offs,
        heads,
        post,
        head_elems,
        layout.row_elems,
        BF16=bf16,
        TILE=_tile(head_elems),
    )
