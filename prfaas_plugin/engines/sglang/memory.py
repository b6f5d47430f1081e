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
  gathered on the GPU by the one pack/unpack engine (``prfaas_plugin.kernels``) and copied into
  pinned staging from the bounded pool of ``kernels.device.DevicePath``, on its side stream;
  the receive side lands bytes in pooled pinned staging, copies them to the device on that
  stream and scatters them there. The device pointer is wrapped with
  ``__cuda_array_interface__`` so no copy or registration of the pool is needed. It needs
  torch with CUDA (every GPU SGLang has it).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
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


class _Owned:
    """Host bytes exposed to numpy through the array interface, so that views of them keep this
    object (and with it a staging lease) alive."""

    def __init__(self, arr: np.ndarray) -> None:
        self.__array_interface__ = {
            "shape": (arr.size,),
            "typestr": "|u1",
            "data": (arr.ctypes.data, False),
            "version": 3,
        }


class CudaSpace:
    """Buffers in CUDA device memory, staged through the pinned pool of a ``DevicePath``.

    The caller orders a gather after the kernels that wrote the pages: it records an event on
    the scheduler's (forward) stream with ``record_event`` and passes it as ``after``; the
    gather and the device-to-host copy then run on the side stream, which waits on that event on
    the device. ``gather`` returns once that copy's own event fired (this thread waits on that
    event only, never on the device); ``scatter`` likewise for its host-to-device copy and the
    scatter kernel. Staging goes back to the pool when the returned array (or landing view) is
    dropped. ``seam``: the CUDA calls (tests record them; see kernels/device.py)."""

    def __init__(
        self, device: str = "cuda", pool_bytes: int | None = None, seam: Any = None, backend: Any = None
    ) -> None:
        import torch  # local: only GPU deployments get here

        from prfaas_plugin.kernels.device import DEFAULT_POOL_BYTES, DevicePath

        if seam is None and not torch.cuda.is_available():
            raise AddressError("CUDA buffers registered but torch.cuda is not available")
        self._torch = torch
        self.path = DevicePath(device, DEFAULT_POOL_BYTES if pool_bytes is None else pool_bytes, seam, backend)
        self._device = self.path.device
        self._groups: dict[tuple[int, int, int], Any] = {}
        self._landings: dict[int, Any] = {}  # host address of a landing view -> its lease
        self._lock = threading.Lock()

    def record_event(self) -> Any:
        """An event on the caller's current (forward) stream, to order a later gather after it."""
        seam = self.path.seam
        return seam.record(seam.current_stream(self._device))

    def _matrix(self, region: Region) -> Any:
        t = self._torch.as_tensor(_CudaBytes(region.ptr, region.capacity * region.item_len), device=self._device)
        return t.view(region.capacity, region.item_len)

    def _group(self, region: Region) -> Any:
        from prfaas_plugin.kernels import CacheGroup, PagedLayout

        key = (region.ptr, region.nbytes, region.item_len)
        with self._lock:
            if key not in self._groups:
                m = self._matrix(region)
                self._groups[key] = CacheGroup([m], PagedLayout.of(m, block_dim=0))
            return self._groups[key]

    def _owned(self, lease: Any) -> tuple[np.ndarray, _Owned]:
        """The lease as a numpy array that gives it back to the pool when the last view of it
        dies (every numpy view of the array keeps ``owner`` alive as its base)."""
        owner = _Owned(lease.array)
        weakref.finalize(owner, lease.release)
        return np.asarray(owner), owner

    def gather(self, region: Region, indices: Sequence[int] | np.ndarray, after: Any = None) -> np.ndarray:
        from prfaas_plugin.kernels import pack

        idx = region.check(np.asarray(indices))
        group = self._group(region)
        staged = self.path.stage_out(
            lambda: pack(group, idx, backend=self.path.backend), idx.size * region.item_len, after
        )
        staged.wait()
        self._report_pool()
        assert staged.lease is not None
        return self._owned(staged.lease)[0].reshape(idx.size, region.item_len)

    def landing(self, region: Region, indices: np.ndarray) -> tuple[memoryview, bool]:
        idx = region.check(indices)
        lease = self.path.landing(idx.size * region.item_len)
        arr, owner = self._owned(lease)
        addr = arr.ctypes.data
        with self._lock:
            self._landings[addr] = lease
        weakref.finalize(owner, self._forget, addr)
        return arr.data, False

    def _forget(self, addr: int) -> None:
        with self._lock:
            self._landings.pop(addr, None)

    def scatter(self, region: Region, indices: np.ndarray, data: memoryview) -> None:
        from prfaas_plugin.kernels import unpack

        idx = region.check(indices)
        nbytes = memoryview(data).nbytes
        if nbytes != idx.size * region.item_len:
            raise AddressError(f"{region.name}: {nbytes} bytes for {idx.size} items of {region.item_len}")
        with self._lock:
            lease = self._landings.get(np.frombuffer(data, dtype=np.uint8).ctypes.data)
        if lease is None:
            raise AddressError(f"{region.name}: scatter of a buffer that is not a landing of this space")
        group = self._group(region)
        staged = self.path.stage_in(lease, lambda dev: unpack(dev, group, idx, backend=self.path.backend))
        staged.wait()  # this (receiver) thread waits on the scatter's event, not on the device
        self._report_pool()

    def pool_stats(self) -> dict[str, int]:
        return self.path.pool_stats()

    def _report_pool(self) -> None:
        from prfaas_plugin.engines.sglang.metrics import record_staging_pool

        st = self.path.pool_stats()
        record_staging_pool(st["capacity_bytes"], st.get("in_use_bytes", 0))


def space_for(device: str, pool_bytes: int | None = None) -> MemorySpace:
    """The memory space of SGLang's KV/state pools for ``--device`` (aux rows are always host);
    ``pool_bytes``: the pinned staging of a CUDA space."""
    if device.startswith("cuda"):
        return CudaSpace(device, pool_bytes)
    if device == "cpu":
        return HostSpace()
    raise AddressError(f"prfaas transfer backend: device {device!r} is not supported (cpu and cuda are)")
