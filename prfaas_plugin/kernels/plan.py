"""Turn (layout, layer tensors, block ids) into per-row source offsets and the buffer geometry.

Both back ends consume the same plan: the Triton kernels read the offset table (one launch
moves every row of every layer), the torch path reads the same numbers as strided views.
Offsets are counted in *words* relative to layer 0's first byte, a word being the widest
integer type that divides every row size, stride and layer distance: copies stay bit exact for
any dtype (bf16, fp8, int8 state pages) and the GPU moves 8-byte words where it can.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .layout import PagedLayout

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_ALIGN = 16  # scales start on a 16-byte boundary inside an fp8 buffer


@dataclass(frozen=True)
class PackGeometry:
    """Sizes of one packed buffer (see ``packed_nbytes``)."""

    num_layers: int
    num_outer: int
    num_blocks: int  # blocks of the request being moved
    row_elems: int
    row_bytes: int
    num_heads: int
    fp8: bool

    @property
    def num_rows(self) -> int:
        return self.num_layers * self.num_outer * self.num_blocks

    @property
    def payload_bytes(self) -> int:
        per_row = self.row_elems if self.fp8 else self.row_bytes
        return self.num_rows * per_row

    @property
    def scales_offset(self) -> int:
        return _round_up(self.payload_bytes, FP8_ALIGN)

    @property
    def nbytes(self) -> int:
        if not self.fp8:
            return self.payload_bytes
        return self.scales_offset + self.num_rows * self.num_heads * 4


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def geometry(layout: PagedLayout, num_layers: int, num_blocks: int, fp8: bool) -> PackGeometry:
    return PackGeometry(
        num_layers, layout.num_outer, num_blocks, layout.row_elems, layout.row_bytes, layout.num_heads, fp8
    )


def block_index(
    block_ids: Sequence[int] | np.ndarray | torch.Tensor, layout: PagedLayout, device: torch.device
) -> torch.Tensor:
    """Validated int64 block ids on ``device``; out-of-range ids are refused here, because the
    kernels trust them and would otherwise read or write outside the cache."""
    # Checked on the host before the one upload: the ids come from the engine's block table
    # (a list or numpy array); reading a device tensor's min/max would stall on the device.
    ids = block_ids.cpu().numpy() if isinstance(block_ids, torch.Tensor) else block_ids
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"block_ids must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= layout.num_blocks:
            raise ValueError(f"block id out of range [0, {layout.num_blocks}): min {lo}, max {hi}")
    return torch.as_tensor(arr, device=device)


def caches_alignment(caches: Sequence[torch.Tensor], layout: PagedLayout) -> int:
    """The gcd of row size, strides (bytes) and pointers of ``caches``: fixed for a group, so
    callers keep it rather than walk every layer's strides again per request."""
    isz = layout.itemsize
    g = layout.row_bytes
    for t in caches:
        g = math.gcd(g, t.data_ptr())
        for d in range(layout.block_dim + 1):
            g = math.gcd(g, t.stride(d) * isz)
    return g


def word_bytes(
    caches: Sequence[torch.Tensor], layout: PagedLayout, *extra_bytes: int, alignment: int | None = None
) -> int:
    """Widest word (8/4/2/1 bytes) that divides row size, strides, pointers and ``extra_bytes``
    (``alignment``: ``caches_alignment`` of the caches, if already known)."""
    g = caches_alignment(caches, layout) if alignment is None else alignment
    for e in extra_bytes:
        g = math.gcd(g, e)
    for w in (8, 4, 2, 1):
        if g % w == 0:
            return w
    return 1


def word_dtype(nbytes: int) -> torch.dtype:
    return _WORD_DTYPES[nbytes]


def outer_offsets_bytes(t: torch.Tensor, layout: PagedLayout) -> list[int]:
    """Byte offset of each outer index (e.g. K then V), in row-major order of the outer dims."""
    isz = layout.itemsize
    ranges = [range(s) for s in layout.outer_shape]
    strides = t.stride()[: layout.block_dim]
    return [sum(i * s for i, s in zip(multi, strides)) * isz for multi in itertools.product(*ranges)]


def row_offsets(caches: Sequence[torch.Tensor], layout: PagedLayout, idx: torch.Tensor, wbytes: int) -> torch.Tensor:
    """Word offset of every buffer row's source/destination row, relative to ``caches[0]``,
    in buffer order ``[layer, outer, block]``: the descriptor table of the single launch."""
    base = caches[0].data_ptr()
    isz = layout.itemsize
    layer_outer: list[int] = []
    for t in caches:
        lo = t.data_ptr() - base
        layer_outer.extend(lo + o for o in outer_offsets_bytes(t, layout))
    bstrides = {t.stride(layout.block_dim) for t in caches}
    lo_t = torch.tensor(layer_outer, dtype=torch.int64, device=idx.device) // wbytes
    if len(bstrides) == 1:
        bstride_w = bstrides.pop() * isz // wbytes
        return (lo_t[:, None] + idx[None, :] * bstride_w).reshape(-1)
    per_layer = [
        torch.full(
            (layout.num_outer,), t.stride(layout.block_dim) * isz // wbytes, dtype=torch.int64, device=idx.device
        )
        for t in caches
    ]
    bs = torch.cat(per_layer)
    return (lo_t[:, None] + idx[None, :] * bs[:, None]).reshape(-1)
