"""Staging device memory through a bounded pool of pinned host buffers.

A GPU tensor cannot be handed to ``send``: its bytes must first reach host memory. The sender
copies each chunk into a pinned slot just before it goes on the wire, so N data connections
overlap N device-to-host copies with sending, and the pool bounds host memory (a full pool
blocks the connection that wants a slot: backpressure). Resends re-stage from the device
source, which the caller keeps alive until ``done``.

The copy and the allocation are pluggable so the exact code path runs on a CPU-only host
(``tests/test_transfer_staging.py`` drives it with a host-memory twin of a device)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prfaas_plugin.transfer.buffers import byte_view, is_device_tensor


class Stager(Protocol):
    def wants(self, obj: Any) -> bool:
        """True if ``obj`` must be staged (it is not host memory)."""

    def nbytes(self, obj: Any) -> int: ...

    def stage(self, obj: Any, offset: int, length: int) -> contextlib.AbstractContextManager[memoryview]:
        """A host view of ``obj``'s bytes ``[offset, offset+length)``, valid inside the block."""


class StagingPool:
    """Fixed number of equal host slots; ``slot()`` blocks while all are taken."""

    def __init__(self, capacity_bytes: int, slot_bytes: int, alloc: Callable[[int], Any]) -> None:
        if slot_bytes <= 0 or capacity_bytes < slot_bytes:
            raise ValueError("StagingPool needs capacity_bytes >= slot_bytes > 0")
        self.slot_bytes = slot_bytes
        self._owners = [alloc(slot_bytes) for _ in range(capacity_bytes // slot_bytes)]
        self._free = list(range(len(self._owners)))
        self._cond = threading.Condition()
        self.in_use = 0
        self.peak_in_use = 0

    @property
    def slots(self) -> int:
        return len(self._owners)

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None) -> Iterator[tuple[Any, memoryview]]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                raise TimeoutError("no staging slot became free")
            idx = self._free.pop()
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        try:
            owner = self._owners[idx]
            yield owner, byte_view(owner, writable=True)
        finally:
            with self._cond:
                self._free.append(idx)
                self.in_use -= 1
                self._cond.notify()


class PooledStager:
    """Stages through a ``StagingPool`` with a pluggable ``copy(dst_owner, src, offset,
    length)`` that fills the first ``length`` bytes of the slot and returns once they are in
    host memory."""

    def __init__(
        self,
        pool: StagingPool,
        copy: Callable[[Any, Any, int, int], None],
        wants: Callable[[Any], bool],
        nbytes: Callable[[Any], int],
    ) -> None:
        self.pool = pool
        self._copy = copy
        self._wants = wants
        self._nbytes = nbytes
        self.copies = 0
        self.bytes_staged = 0
        self._lock = threading.Lock()

    def wants(self, obj: Any) -> bool:
        return self._wants(obj)

    def nbytes(self, obj: Any) -> int:
        return self._nbytes(obj)

    @contextlib.contextmanager
    def stage(self, obj: Any, offset: int, length: int) -> Iterator[memoryview]:
        if length > self.pool.slot_bytes:
            raise ValueError(f"chunk of {length} bytes exceeds the staging slot ({self.pool.slot_bytes})")
        with self.pool.slot(timeout=60.0) as (owner, view):
            self._copy(owner, obj, offset, length)
            with self._lock:
                self.copies += 1
                self.bytes_staged += length
            yield view[:length]


def torch_pinned_stager(
    capacity_bytes: int, slot_bytes: int, wants: Callable[[Any], bool] = is_device_tensor
) -> PooledStager:
    """The GPU path: pinned uint8 host slots filled by device-to-host copies. ``wants`` may be
    widened (tests route CPU tensors through the very same copy code)."""
    import torch

    def alloc(n: int) -> Any:
        return torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())

    def copy(dst: Any, src: Any, offset: int, length: int) -> None:
        flat = src.reshape(-1).view(torch.uint8)
        dst[:length].copy_(flat[offset : offset + length], non_blocking=True)
        if flat.is_cuda:
            # Each data connection stages on its own thread; waiting on the current stream
            # keeps the copy ordered after the kernels that produced the layer.
            torch.cuda.current_stream(flat.device).synchronize()

    def nbytes(t: Any) -> int:
        return int(t.numel() * t.element_size())

    return PooledStager(StagingPool(capacity_bytes, slot_bytes, alloc), copy, wants, nbytes)
