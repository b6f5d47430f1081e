"""The dispatcher: validate at the edge, then hand one cache group to the Triton or torch path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import torch_ops
from .layout import PagedLayout
from .plan import block_index, caches_alignment, geometry, word_bytes

Backend = Literal["torch", "triton"]
#: A request's block ids: the engine's block table (list or numpy array) or a tensor.
BlockIds = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class CacheGroup:
    """The per-layer cache tensors of one KV-cache group (same spec, one block table) and
    their shared layout. Validated once at construction, so pack/unpack stay cheap."""

    caches: tuple[torch.Tensor, ...]
    layout: PagedLayout

    def __init__(self, caches: Sequence[torch.Tensor], layout: PagedLayout) -> None:
        object.__setattr__(self, "caches", tuple(caches))
        object.__setattr__(self, "layout", layout)
        layout.check(self.caches)

    @classmethod
    def vllm_attention_gpu(cls, caches: Sequence[torch.Tensor]) -> CacheGroup:
        return cls(caches, PagedLayout.vllm_attention_gpu(caches[0]))

    @classmethod
    def vllm_attention_cpu(cls, caches: Sequence[torch.Tensor]) -> CacheGroup:
        return cls(caches, PagedLayout.vllm_attention_cpu(caches[0]))

    @classmethod
    def mla(cls, caches: Sequence[torch.Tensor]) -> CacheGroup:
        return cls(caches, PagedLayout.mla(caches[0]))

    @classmethod
    def state(cls, caches: Sequence[torch.Tensor]) -> CacheGroup:
        return cls(caches, PagedLayout.state(caches[0]))

    def row_views(self, wbytes: int) -> tuple[torch.Tensor, ...]:
        """Every (layer, K/V) slice as a ``[num_blocks, row_words]`` view, built once per word
        size and kept: building them costs tens of microseconds per layer, a third of the copy
        itself for a layer of a few small state pages (bench/kernels.py, GDN case)."""
        cache = self.__dict__.setdefault("_row_views", {})  # frozen dataclass: not a field
        if wbytes not in cache:
            cache[wbytes] = tuple(torch_ops.row_views(self.caches, self.layout, wbytes))
        return cache[wbytes]

    def word_bytes(self, buf: torch.Tensor) -> int:
        """Widest word size the caches and ``buf`` allow (the caches' part computed once)."""
        align = self.__dict__.get("_alignment")
        if align is None:
            align = self.__dict__["_alignment"] = caches_alignment(self.caches, self.layout)
        return word_bytes(self.caches, self.layout, buf.data_ptr(), alignment=align)

    @property
    def device(self) -> torch.device:
        return self.caches[0].device

    @property
    def num_layers(self) -> int:
        return len(self.caches)


def packed_nbytes(group: CacheGroup, num_blocks: int, fp8: bool = False) -> int:
    """Bytes of the buffer ``pack`` fills for ``num_blocks`` blocks of every layer."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    return geometry(group.layout, group.num_layers, num_blocks, fp8).nbytes


def _choose(group: CacheGroup, backend: Backend | None) -> Backend:
    if backend is None:
        return "torch" if group.device.type == "cpu" else "triton"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    return backend


def _check_fp8(group: CacheGroup, fp8: bool, lossy_states: bool) -> None:
    if fp8 and group.layout.lossless and not lossy_states:
        raise ValueError("fp8 refused for a recurrent-state group (lossless); pass lossy_states=True to force")
    if fp8 and not group.layout.dtype.is_floating_point:
        raise ValueError(f"fp8 needs a floating cache dtype, got {group.layout.dtype}")


def _check_buffer(buf: torch.Tensor, group: CacheGroup, nbytes: int, what: str) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-D uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    if buf.numel() < nbytes:
        raise ValueError(f"{what} holds {buf.numel()} bytes, {nbytes} needed")
    if buf.device != group.device:
        raise ValueError(f"{what} on {buf.device}, caches on {group.device}")


def pack(
    group: CacheGroup,
    block_ids: BlockIds,
    out: torch.Tensor | None = None,
    fp8: bool = False,
    *,
    lossy_states: bool = False,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Gather ``block_ids`` of every layer of ``group`` into one uint8 buffer (returned; ``out``
    if given, which may be larger). Block ids may repeat and come in any order."""
    _check_fp8(group, fp8, lossy_states)
    lay = group.layout
    idx = block_index(block_ids, lay, group.device)
    geo = geometry(lay, group.num_layers, idx.numel(), fp8)
    if out is None:
        out = torch.empty(geo.nbytes, dtype=torch.uint8, device=group.device)
    _check_buffer(out, group, geo.nbytes, "out")
    if geo.num_rows == 0:
        return out
    if fp8:
        out[geo.payload_bytes : geo.scales_offset].zero_()  # alignment gap: never ship stale memory
    if _choose(group, backend) == "triton":
        from . import triton_ops

        triton_ops.pack(group.caches, lay, idx, out, geo, group.word_bytes(out))
    elif fp8:
        torch_ops.pack_fp8(group.caches, lay, idx, out, geo)
    else:
        wb = group.word_bytes(out)
        torch_ops.pack_raw(group.row_views(wb), lay, idx, out, wb)
    return out


def unpack(
    buf: torch.Tensor,
    group: CacheGroup,
    block_ids: BlockIds,
    fp8: bool = False,
    *,
    lossy_states: bool = False,
    backend: Backend | None = None,
) -> None:
    """Scatter a buffer made by ``pack`` into ``block_ids`` of every layer of ``group`` (the
    receiver's own ids, same count as packed). Repeated destination ids: the last copy wins
    on CPU, an unspecified one on GPU — do not repeat ids you care about."""
    _check_fp8(group, fp8, lossy_states)
    lay = group.layout
    idx = block_index(block_ids, lay, group.device)
    geo = geometry(lay, group.num_layers, idx.numel(), fp8)
    _check_buffer(buf, group, geo.nbytes, "buf")
    if geo.num_rows == 0:
        return
    if _choose(group, backend) == "triton":
        from . import triton_ops

        triton_ops.unpack(buf, group.caches, lay, idx, geo, group.word_bytes(buf))
    elif fp8:
        torch_ops.unpack_fp8(buf, group.caches, lay, idx, geo)
    else:
        wb = group.word_bytes(buf)
        torch_ops.unpack_raw(buf, group.row_views(wb), lay, idx, wb)
