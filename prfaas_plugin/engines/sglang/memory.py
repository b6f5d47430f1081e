"""Addressing SGLang's registered buffers by raw pointer, page (or slot) index and item length.

SGLang hands a transfer backend bare addresses: ``KVArgs.kv_data_ptrs[i]`` with its total length
``kv_data_lens[i]`` and the bytes of one page ``kv_item_lens[i]``; the same triple exists for the
aux (metadata) rows and for every state component (Mamba slots, SWA pages...). Page ``p`` of
buffer ``i`` lives at ``ptr + p * item_len``. This module turns such a triple into a
``(capacity, item_len)`` byte matrix so that a request's pages can be gathered into one
contiguous wire item and scattered back, with every index bounds-checked first: a bad page id
from a peer must raise, never write outside the pool.

Two memory spaces:

* ``HostSpace``: the buffer is ordinary host memory (SGLang's CPU device, and the aux rows,
  which SGLang keeps on the CPU). The matrix is a zero-copy numpy view made with ctypes; a run
  of consecutive pages is sent and received in place, other page lists cost one gather/scatter.
* ``CudaSpace``: the buffer is CUDA device memory. It cannot be read by the CPU, so pages are
  gathered on the GPU (``index_select``) and copied once into pinned host staging for the
  socket; the receive side lands bytes in pinned staging and copies them back with one
  ``index_copy_``. The device pointer is wrapped with ``__cuda_array_interface__`` so no copy
  or registration of the pool is needed. It needs torch with CUDA (every GPU SGLang has it).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class AddressError(ValueError):
    """A page/slot index or a pointer does not fit the registered buffer."""


@dataclass(frozen=True)
class Region:
    """One registered buffer: base address, total bytes, bytes per page (or per state slot)."""

    ptr: int
    nbytes: int
    item_len: int
    name: str = "buffer"

    def __post_init__(self) -> None:
        if self.item_len <= 0:
            raise AddressError(f"{self.name}: item_len must be > 0, got {self.item_len}")
        if self.nbytes < 0:
            raise AddressError(f"{self.name}: length must be >= 0, got {self.nbytes}")
        if self.ptr <= 0 and self.nbytes > 0:
            raise AddressError(f"{self.name}: null pointer for a {self.nbytes}-byte buffer")

    @property
    def capacity(self) -> int:
        """How many whole items (pages or slots) the buffer holds."""
        return self.nbytes // self.item_len

    def check(self, indices: np.ndarray) -> np.ndarray:
        """Return ``indices`` as int64 after checking every one addresses a whole item."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.capacity):
            bad = idx[(idx < 0) | (idx >= self.capacity)]
            raise AddressError(
                f"{self.name}: index {int(bad[0])} outside [0, {self.capacity}) "
                f"({self.nbytes} bytes / item_len {self.item_len})"
            )
        return idx


def consecutive_start(idx: np.ndarray) -> int | None:
    """The first index if ``idx`` is one ascending run ``s, s+1, ...``; ``None`` otherwise.
    Runs are common (a fresh request's pages are often allocated together) and let the
    transfer read and write the pool in place instead of gathering."""
    if idx.size == 0:
        return None
    start = int(idx[0])
    if idx.size == 1 or (int(idx[-1]) - start == idx.size - 1 and bool(np.all(np.diff(idx) == 1))):
        return start
    return None


class MemorySpace(Protocol):
    """Where a region's bytes live, and how to move whole items in and out of it."""

    def gather(self, region: Region, indices: Sequence[int] | np.ndarray) -> Any:
        """The items at ``indices``, back to back, as a C-contiguous byte buffer (numpy array
        or memoryview) that stays valid and unchanged until the caller drops it."""

    def landing(self, region: Region, indices: np.ndarray) -> tuple[memoryview, bool]:
        """A writable buffer for the items at ``indices``; ``True`` if it *is* the pool (so
        nothing is left to do), ``False`` if ``scatter`` must be called once it is full."""

    def scatter(self, region: Region, indices: np.ndarray, data: memoryview) -> None:
        """Write ``data`` (items back to back) into the pool at ``indices``."""


def _host_matrix(region: Region) -> np.ndarray:
    cap = region.capacity
    if cap == 0:
        return np.empty((0, region.item_len), dtype=np.uint8)
    raw = (ctypes.c_uint8 * (cap * region.item_len)).from_address(region.ptr)
    return np.ctypeslib.as_array(raw).reshape(cap, region.item_len)


class HostSpace:
    """Buffers in host memory, addressed in place through ctypes."""

    def gather(self, region: Region, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = region.check(np.asarray(indices))
        rows = _host_matrix(region)
        start = consecutive_start(idx)
        if start is not None:
            # Zero-copy: SGLang keeps a request's pages allocated until the transfer succeeds.
            return rows[start : start + idx.size]
        return np.take(rows, idx, axis=0)

    def landing(self, region: Region, indices: np.ndarray) -> tuple[memoryview, bool]:
        idx = region.check(indices)
        start = consecutive_start(idx)
        if start is not None:
            rows = _host_matrix(region)
            return rows[start : start + idx.size].reshape(-1).data, True
        return np.empty(idx.size * region.item_len, dtype=np.uint8).data, False

    def scatter(self, region: Region, indices: np.ndarray, data: memoryview) -> None:
        idx = region.check(indices)
        src = np.frombuffer(data, dtype=np.uint8)
        if src.size != idx.size * region.item_len:
            raise AddressError(f"{region.name}: {src.size} bytes for {idx.size} items of {region.item_len}")
        _host_matrix(region)[idx] = src.reshape(idx.size, region.item_len)


class _CudaBytes:
    """Lets torch wrap a raw device pointer without copying (CUDA array interface v3)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class CudaSpace:
    """Buffers in CUDA device memory, staged through pinned host memory.

    The caller orders a gather after the kernels that wrote the pages (the manager records an
    event on the scheduler's stream with ``record_event`` and waits on it in its worker);
    ``synchronize`` after each copy makes the staged bytes safe for the socket."""

    def __init__(self, device: str = "cuda") -> None:
        import torch  # local: only GPU deployments get here

        if not torch.cuda.is_available():
            raise AddressError("CUDA buffers registered but torch.cuda is not available")
        self._torch = torch
        self._device = torch.device(device)

    def record_event(self) -> Any:
        """A CUDA event on the caller's current stream (to order a later gather after it)."""
        ev = self._torch.cuda.Event()
        ev.record(self._torch.cuda.current_stream(self._device))
        return ev

    def _matrix(self, region: Region) -> Any:
        t = self._torch.as_tensor(_CudaBytes(region.ptr, region.capacity * region.item_len), device=self._device)
        return t.view(region.capacity, region.item_len)

    def gather(self, region: Region, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        torch = self._torch
        idx = region.check(np.asarray(indices))
        staged = torch.empty((idx.size, region.item_len), dtype=torch.uint8, pin_memory=True)
        dev_idx = torch.from_numpy(idx).to(self._device)
        staged.copy_(self._matrix(region).index_select(0, dev_idx))
        torch.cuda.current_stream(self._device).synchronize()
        return staged.numpy()

    def landing(self, region: Region, indices: np.ndarray) -> tuple[memoryview, bool]:
        idx = region.check(indices)
        staged = self._torch.empty(idx.size * region.item_len, dtype=self._torch.uint8, pin_memory=True)
        return staged.numpy().data, False

    def scatter(self, region: Region, indices: np.ndarray, data: memoryview) -> None:
        torch = self._torch
        idx = region.check(indices)
        src = torch.frombuffer(data, dtype=torch.uint8)
        if src.numel() != idx.size * region.item_len:
            raise AddressError(f"{region.name}: {src.numel()} bytes for {idx.size} items of {region.item_len}")
        rows = src.view(idx.size, region.item_len).to(self._device, non_blocking=True)
        self._matrix(region).index_copy_(0, torch.from_numpy(idx).to(self._device), rows)
        torch.cuda.current_stream(self._device).synchronize()


def space_for(device: str) -> MemorySpace:
    """The memory space of SGLang's KV/state pools for ``--device`` (aux rows are always host)."""
    if device.startswith("cuda"):
        return CudaSpace(device)
    if device == "cpu":
        return HostSpace()
    raise AddressError(f"prfaas transfer backend: device {device!r} is not supported (cpu and cuda are)")
