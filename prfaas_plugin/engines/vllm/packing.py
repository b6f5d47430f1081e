"""The vLLM connector's view of the KV data path: vLLM's per-layer cache tensors (block index in
dim 0, ``[blocks, ...]``, or dim 1, ``[2, blocks, ...]``; ``block_dim`` says which) handed to
the one pack/unpack engine, ``prfaas_plugin.kernels``.

CPU caches are packed straight into a host tensor that the transfer engine sends in place.
CUDA caches go through ``kernels.device.DevicePath``: gather into a device buffer on a side
stream ordered after the forward stream, copy into pinned staging from a bounded pool, send that
(and the reverse on the consumer), so the forward stream never waits on a transfer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from prfaas_plugin import kernels
from prfaas_plugin.kernels.device import DEFAULT_POOL_BYTES, DevicePath, Lease, Seam, Staged


def block_bytes(cache: torch.Tensor, block_dim: int) -> int:
    return cache.numel() // cache.shape[block_dim] * cache.element_size()


def _shape(cache: torch.Tensor, block_dim: int, n: int) -> list[int]:
    shape = list(cache.shape)
    shape[block_dim] = n
    return shape


def gather_rows(packed: torch.Tensor, dim: int, slices: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The rows ``[(start, count), ...]`` of ``packed`` along ``dim``, concatenated into one
    contiguous tensor: what a prefill rank sends to one decode rank of another TP size."""
    return torch.cat([packed.narrow(dim, start, count) for start, count in slices], dim=dim).contiguous()


def _scatter_rows(
    cache: torch.Tensor,
    block_dim: int,
    block_ids: Sequence[int],
    flat: torch.Tensor,
    dim: int,
    slices: Sequence[tuple[int, int, int]],
    skip_before: int,
) -> None:
    """A heterogeneous-TP piece: some rows of every block. Rows along a non-block dim are not one
    run of bytes per block, so this is a strided index_copy_ per slice, not a kernels call."""
    shape = _shape(cache, block_dim, len(block_ids))
    shape[dim] = sum(c for _, _, c in slices)
    staged = flat.view(torch.uint8).view(cache.dtype).view(shape)
    if skip_before:
        staged = staged.narrow(block_dim, skip_before, len(block_ids) - skip_before)
        block_ids = list(block_ids)[skip_before:]
    if not len(block_ids):
        return
    idx = torch.tensor(list(block_ids), dtype=torch.long, device=cache.device)
    for src, dst, count in slices:
        cache.narrow(dim, dst, count).index_copy_(block_dim, idx, staged.narrow(dim, src, count))


class Packer:
    """Packs and unpacks vLLM cache parts through ``kernels`` (one ``CacheGroup`` per part, built
    once) and owns the device paths (side stream, pinned pool) of the CUDA devices it meets."""

    def __init__(
        self, pool_bytes: int = DEFAULT_POOL_BYTES, seam: Seam | None = None, backend: kernels.Backend | None = None
    ) -> None:
        self.pool_bytes = pool_bytes
        self.seam, self.backend = seam, backend
        self._groups: dict[tuple[int, int], kernels.CacheGroup] = {}
        self._paths: dict[torch.device, DevicePath] = {}
        self._lock = threading.Lock()

    def group(self, cache: torch.Tensor, block_dim: int) -> kernels.CacheGroup:
        key = (id(cache), block_dim)
        g = self._groups.get(key)
        if g is None or g.caches[0] is not cache:
            g = self._groups[key] = kernels.CacheGroup([cache], kernels.PagedLayout.of(cache, block_dim=block_dim))
        return g

    def path(self, device: torch.device) -> DevicePath | None:
        """The device path of a CUDA (or other accelerator) device; None for host caches."""
        if device.type == "cpu":
            return None
        with self._lock:
            if device not in self._paths:
                self._paths[device] = DevicePath(device, self.pool_bytes, self.seam, self.backend)
            return self._paths[device]

    def pool_stats(self) -> dict[str, int]:
        """Summed over devices, for the staging-pool gauges."""
        out: dict[str, int] = {}
        for p in list(self._paths.values()):
            for k, v in p.pool_stats().items():
                out[k] = out.get(k, 0) + v
        return out

    # -- producer ------------------------------------------------------------------------------
    def pack(self, cache: torch.Tensor, block_dim: int, block_ids: Sequence[int]) -> torch.Tensor:
        """``block_ids`` of ``cache`` as one contiguous tensor of the cache's shape with
        ``len(block_ids)`` blocks, on the cache's device."""
        g = self.group(cache, block_dim)
        path = self.path(cache.device)
        out = kernels.pack(g, block_ids, backend=path.backend if path is not None else None)
        return out.view(cache.dtype).view(_shape(cache, block_dim, len(block_ids)))

    def stage_send(
        self,
        cache: torch.Tensor,
        block_dim: int,
        block_ids: Sequence[int],
        rows: tuple[int, Sequence[tuple[int, int]]] | None = None,
    ) -> Staged:
        """The bytes to send for ``block_ids`` (``rows``: only those ``(dim, [(start, count)])``
        rows, for a decode rank of another TP size), in host memory once ``ready()``."""

        def gather() -> torch.Tensor:
            packed = self.pack(cache, block_dim, block_ids)
            return packed if rows is None else gather_rows(packed, rows[0], rows[1])

        path = self.path(cache.device)
        if path is None:
            return Staged(gather())
        nbytes = block_bytes(cache, block_dim) * len(block_ids)
        if rows is not None:
            nbytes = nbytes // cache.shape[rows[0]] * sum(c for _, c in rows[1])
        return path.stage_out(gather, nbytes)

    # -- consumer ------------------------------------------------------------------------------
    def landing(self, cache: torch.Tensor, nbytes: int) -> tuple[memoryview, torch.Tensor | Lease]:
        """Where an incoming item for ``cache`` lands: a host tensor for a CPU cache, pinned
        staging from the pool for a device cache."""
        path = self.path(cache.device)
        if path is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            return buf.numpy().data, buf
        lease = path.landing(nbytes)
        return lease.array.data, lease

    def unpack(
        self,
        cache: torch.Tensor,
        block_dim: int,
        block_ids: Sequence[int],
        landed: torch.Tensor | Lease,
        skip_before: int = 0,
        rows: tuple[int, Sequence[tuple[int, int, int]]] | None = None,
    ) -> Staged:
        """Scatter a landed item (``len(block_ids)`` blocks, or those ``rows`` of them) into
        ``block_ids`` of ``cache``; the first ``skip_before`` blocks are not written (the
        consumer holds them from its prefix cache). Done once ``ready()``."""

        def scatter(flat: torch.Tensor) -> None:
            if rows is not None:
                _scatter_rows(cache, block_dim, block_ids, flat, rows[0], rows[1], skip_before)
            else:
                self._unpack_whole(cache, block_dim, block_ids, flat, skip_before)

        if isinstance(landed, Lease):
            path = self.path(cache.device)
            assert path is not None, "a pinned lease for a host cache"
            return path.stage_in(landed, scatter)
        scatter(landed)
        return Staged(landed)

    def _unpack_whole(
        self, cache: torch.Tensor, block_dim: int, block_ids: Sequence[int], flat: torch.Tensor, skip: int
    ) -> None:
        ids = list(block_ids)
        g = self.group(cache, block_dim)
        path = self.path(cache.device)
        backend = path.backend if path is not None else None
        if skip:
            # packed is [*outer, block, row]: drop the held blocks of every outer slice
            outer = g.layout.num_outer
            rows = flat.view(outer, len(ids), g.layout.row_bytes).narrow(1, skip, len(ids) - skip)
            flat, ids = rows.reshape(-1), ids[skip:]  # a view when outer == 1, else one copy
        if ids:
            kernels.unpack(flat, g, ids, backend=backend)
