"""The GPU side of the KV data path, for both engines: streams, events, pinned staging, copies.

Why one module: the rules that keep a transfer from slowing the model down are the same for the
vLLM connector and the SGLang backend, and each is easy to break silently:

* the forward (compute) stream never waits on a transfer: gathers, device-to-host and
  host-to-device copies and scatters run on one *side stream* per device, which waits on an
  event the caller records on the forward stream once the KV it needs is written;
* host memory for the wire is pinned and comes from one bounded ``PinnedPool`` allocated once;
  a full pool makes the next transfer wait (backpressure), it never allocates more;
* completion is an event query (``Staged.ready``), never a device-wide synchronize.

All CUDA calls go through a ``Seam`` so that tests on a CPU-only machine can run the very same
path on fake CUDA tensors and record which stream each copy was issued on
(tests/test_gpu_placement.py). ``CudaSeam`` is the real one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .api import Backend, CacheGroup, pack, unpack

#: Default pinned staging per device: a few 32K-token requests of the hybrid models in
#: /work/shared/models in flight at once (a 32K-token request: ~1.1 GiB Qwen3-Next-like, ~0.3 GiB
#: Kimi-Linear-like; bench/gpu_check.py).
DEFAULT_POOL_BYTES = 4 << 30
#: Leases are aligned so every staged item starts on a boundary the widest copy word allows.
ALIGN = 256


class Seam(Protocol):
    """Every CUDA call the data path makes (and nothing else)."""

    def current_stream(self, device: torch.device) -> Any:
        """The stream the engine's forward runs on for this thread."""

    def side_stream(self, device: torch.device) -> Any:
        """The one transfer stream of ``device`` (made on first use)."""

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``stream`` current inside the block (kernels and allocations go there)."""

    def record(self, stream: Any) -> Any:
        """A new event recorded on ``stream``."""

    def wait(self, stream: Any, event: Any) -> None:
        """``stream`` waits (on the device, not the host) for ``event``."""

    def query(self, event: Any) -> bool:
        """True once everything before ``event`` has run; never blocks."""

    def host_wait(self, event: Any) -> None:
        """Block this host thread until ``event`` (only that event, not the device)."""

    def pinned(self, nbytes: int) -> torch.Tensor:
        """Page-locked host bytes (uint8), so copies from and to the device are asynchronous."""

    def host_view(self, pinned: torch.Tensor) -> np.ndarray:
        """A numpy view of the same page-locked bytes (what sockets read and write)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Asynchronous ``dst.copy_(src)`` issued on ``stream`` (which must be current)."""


class CudaSeam:
    """The real CUDA calls."""

    def __init__(self) -> None:
        self._side: dict[torch.device, Any] = {}
        self._lock = threading.Lock()

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def side_stream(self, device: torch.device) -> Any:
        with self._lock:
            if device not in self._side:
                self._side[device] = torch.cuda.Stream(device)
            return self._side[device]

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def record(self, stream: Any) -> Any:
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def query(self, event: Any) -> bool:
        return bool(event.query())

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def host_view(self, pinned: torch.Tensor) -> np.ndarray:
        return pinned.numpy()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        dst.copy_(src, non_blocking=True)


class PoolFull(TimeoutError):
    """No room in the pinned staging pool within the wait allowed (the transfer is refused)."""


class PinnedPool:
    """One pinned host allocation, handed out in aligned byte ranges (first fit, merged on
    release). ``acquire`` blocks while the pool is too full: backpressure on new transfers
    instead of unbounded page-locked memory, which the OS cannot swap."""

    def __init__(self, nbytes: int, seam: Seam) -> None:
        if nbytes <= 0:
            raise ValueError(f"pinned staging pool size must be > 0 bytes, got {nbytes}")
        self.capacity = nbytes
        self.buffer = seam.pinned(nbytes)
        self._host = seam.host_view(self.buffer)  # the same bytes for sockets and memoryviews
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, length), sorted by offset
        self._cond = threading.Condition()
        self.in_use = 0
        self.peak_in_use = 0
        self.waits = 0

    def _take(self, n: int) -> int | None:
        for i, (off, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (off + n, length - n)
                return off
        return None

    def acquire(self, nbytes: int, timeout: float | None = None) -> Lease:
        """``nbytes`` of pinned staging, waiting up to ``timeout`` s for room (None: forever)."""
        if nbytes < 0:
            raise ValueError(f"staging lease of {nbytes} bytes")
        n = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if n > self.capacity:
            raise PoolFull(
                f"an item of {nbytes} bytes does not fit the pinned staging pool ({self.capacity} bytes); "
                "raise staging_pool_mb"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            off = self._take(n)
            if off is None:
                self.waits += 1
            while off is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolFull(
                        f"pinned staging pool full ({self.in_use} of {self.capacity} bytes in use) for "
                        f"{timeout:.1f} s; {nbytes} more bytes needed"
                    )
                self._cond.wait(left)
                off = self._take(n)
            self.in_use += n
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        return Lease(self, off, n, self.buffer.narrow(0, off, nbytes), self._host[off : off + nbytes])

    def _release(self, off: int, n: int) -> None:
        with self._cond:
            self._free.append((off, n))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for o, length in self._free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((o, length))
            self._free = merged
            self.in_use -= n
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """For the ``prfaas_staging_pool_*`` gauges (protocol/metrics.py)."""
        with self._cond:
            return {
                "capacity_bytes": self.capacity,
                "in_use_bytes": self.in_use,
                "peak_in_use_bytes": self.peak_in_use,
                "waits": self.waits,
            }


@dataclass
class Lease:
    """A range of the pool; ``tensor`` and ``array`` are its uint8 views (torch for copies,
    numpy for the socket). Released once, explicitly."""

    pool: PinnedPool
    offset: int
    length: int
    tensor: torch.Tensor
    array: np.ndarray
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.offset, self.length)


@dataclass
class Staged:
    """Bytes on their way between host staging and the device: valid (on the host, or in the
    cache) once ``event`` has fired. ``event`` None: already done (CPU caches)."""

    host: torch.Tensor
    event: Any = None
    lease: Lease | None = None
    seam: Seam | None = None
    keep: list[Any] = field(default_factory=list)  # device buffers the side stream still reads

    def ready(self) -> bool:
        if self.event is None or self.seam is None:
            return True
        if self.seam.query(self.event):
            self.keep.clear()
            return True
        return False

    def wait(self) -> None:
        """Block this thread until the copy is done (event only, never the whole device)."""
        if self.event is not None and self.seam is not None:
            self.seam.host_wait(self.event)
            self.keep.clear()

    def release(self) -> None:
        """Give the staging back (after the bytes were sent, or scattered)."""
        if self.lease is not None:
            self.lease.release()


class DevicePath:
    """Moves packed KV between a device's paged caches and pinned host staging.

    One per device and engine instance; ``pool_bytes`` of pinned memory are allocated at the
    first transfer, once. ``backend`` picks the pack kernels (None: Triton on a GPU, torch on
    CPU; "torch" is the fallback where Triton is missing)."""

    def __init__(
        self,
        device: torch.device | str,
        pool_bytes: int = DEFAULT_POOL_BYTES,
        seam: Seam | None = None,
        backend: Backend | None = None,
        wait_s: float | None = 60.0,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0 if seam is not None else torch.cuda.current_device())
        self.seam: Seam = seam if seam is not None else CudaSeam()
        self.backend = backend if backend is not None else _default_backend(self.device)
        self.wait_s = wait_s
        self._pool_bytes = pool_bytes
        self._pool: PinnedPool | None = None
        self._lock = threading.Lock()

    @property
    def pool(self) -> PinnedPool:
        with self._lock:
            if self._pool is None:
                self._pool = PinnedPool(self._pool_bytes, self.seam)
            return self._pool

    def pool_stats(self) -> dict[str, int]:
        return self._pool.stats() if self._pool is not None else {"capacity_bytes": self._pool_bytes}

    # -- producer ------------------------------------------------------------------------------
    def stage_out(
        self,
        produce: Callable[[], torch.Tensor],
        nbytes: int,
        after: Any = None,
    ) -> Staged:
        """Run ``produce`` (a gather into a new device buffer of ``nbytes`` bytes) on the side
        stream after the forward stream's work so far (or after event ``after``), then copy its
        bytes into a pinned lease; returns at once, before any of it ran."""
        fwd = self.seam.current_stream(self.device)
        ready = after if after is not None else self.seam.record(fwd)
        lease = self.pool.acquire(nbytes, self.wait_s)
        side = self.seam.side_stream(self.device)
        try:
            with self.seam.stream(side):
                self.seam.wait(side, ready)
                dev = produce()  # allocated while the side stream is current: freed safely after it
                flat = dev.reshape(-1).view(torch.uint8)
                if flat.numel() != nbytes:
                    raise ValueError(f"gather produced {flat.numel()} bytes, {nbytes} expected")
                self.seam.copy(lease.tensor, flat, side)
                done = self.seam.record(side)
        except BaseException:
            lease.release()
            raise
        return Staged(lease.tensor, done, lease, self.seam, [dev])

    def pack_out(self, group: CacheGroup, block_ids: Sequence[int], nbytes: int) -> Staged:
        """``stage_out`` of ``kernels.pack(group, block_ids)``, the index built on the device."""

        def gather() -> torch.Tensor:
            return pack(group, block_ids, backend=self.backend)

        return self.stage_out(gather, nbytes)

    # -- consumer ------------------------------------------------------------------------------
    def landing(self, nbytes: int) -> Lease:
        """Pinned staging for an incoming item (released by ``stage_in``'s ``Staged``)."""
        return self.pool.acquire(nbytes, self.wait_s)

    def stage_in(self, lease: Lease, consume: Callable[[torch.Tensor], None]) -> Staged:
        """Copy a landed lease to a device buffer on the side stream and run ``consume`` (the
        scatter) there; ``ready()`` on the result says when the cache holds the bytes."""
        side = self.seam.side_stream(self.device)
        with self.seam.stream(side):
            dev = torch.empty(lease.tensor.numel(), dtype=torch.uint8, device=self.device)
            self.seam.copy(dev, lease.tensor, side)
            consume(dev)
            done = self.seam.record(side)
        return Staged(lease.tensor, done, lease, self.seam, [dev])

    def unpack_in(self, lease: Lease, group: CacheGroup, block_ids: Sequence[int]) -> Staged:
        """``stage_in`` with ``kernels.unpack`` into ``block_ids`` of ``group``."""
        return self.stage_in(lease, lambda dev: unpack(dev, group, block_ids, backend=self.backend))


def _default_backend(device: torch.device) -> Backend:
    if device.type == "cpu":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"
