"""Gather/scatter of KV blocks between the paged cache and a flat transfer buffer.

Kept behind these two functions so a faster kernels library can replace them without touching the
connector. A cache tensor may hold its block index in dim 0 ([blocks, ...]) or dim 1
([2, blocks, ...]); ``block_dim`` says which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack(cache: torch.Tensor, block_dim: int, block_ids: Sequence[int]) -> torch.Tensor:
    """One ``index_select`` into a preallocated contiguous buffer (the zero-copy send source)."""
    idx = torch.tensor(list(block_ids), dtype=torch.long)
    shape = list(cache.shape)
    shape[block_dim] = len(block_ids)
    out = torch.empty(shape, dtype=cache.dtype)
    torch.index_select(cache, block_dim, idx, out=out)
    return out


def unpack(
    cache: torch.Tensor, block_dim: int, block_ids: Sequence[int], flat: torch.Tensor, skip_before: int = 0
) -> None:
    """Scatter ``flat`` (bytes of len(block_ids) blocks) into ``cache``; the first ``skip_before``
    blocks are not written (the consumer already holds them from its prefix cache)."""
    shape = list(cache.shape)
    shape[block_dim] = len(block_ids)
    staged = flat.view(torch.uint8).view(cache.dtype).view(shape)
    if skip_before:
        staged = staged.narrow(block_dim, skip_before, len(block_ids) - skip_before)
        block_ids = list(block_ids)[skip_before:]
    if len(block_ids):
        cache.index_copy_(block_dim, torch.tensor(list(block_ids), dtype=torch.long), staged)


def block_bytes(cache: torch.Tensor, block_dim: int) -> int:
    return cache.numel() // cache.shape[block_dim] * cache.element_size()


def gather_rows(packed: torch.Tensor, dim: int, slices: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The rows ``[(start, count), ...]`` of ``packed`` along ``dim``, concatenated into one
    contiguous tensor: what a prefill rank sends to one decode rank of another TP size."""
    return torch.cat([packed.narrow(dim, start, count) for start, count in slices], dim=dim).contiguous()


def unpack_rows(
    cache: torch.Tensor,
    block_dim: int,
    block_ids: Sequence[int],
    flat: torch.Tensor,
    dim: int,
    slices: Sequence[tuple[int, int, int]],
    skip_before: int = 0,
) -> None:
    """Scatter ``flat`` (``len(block_ids)`` blocks of a gathered piece, ``[(piece row, cache row,
    count), ...]`` along ``dim``) into those rows of ``cache``'s blocks; the first ``skip_before``
    blocks are not written (the consumer holds them already)."""
    shape = list(cache.shape)
    shape[block_dim] = len(block_ids)
    shape[dim] = sum(c for _, _, c in slices)
    staged = flat.view(torch.uint8).view(cache.dtype).view(shape)
    if skip_before:
        staged = staged.narrow(block_dim, skip_before, len(block_ids) - skip_before)
        block_ids = list(block_ids)[skip_before:]
    if not len(block_ids):
        return
    idx = torch.tensor(list(block_ids), dtype=torch.long)
    for src, dst, count in slices:
        cache.narrow(dim, dst, count).index_copy_(block_dim, idx, staged.narrow(dim, src, count))
