"""A request's hold on an instance: the instance's open-request count (its queue depth as the
router sees it, which placement reads) goes up when the lease is taken and down exactly once when
it is released, on every exit path.

Why a lease object rather than paired ``+1``/``-1`` calls: a streamed answer releases its hold
in the body iterator's ``finally``, long after the function that opened it returned, and the
error paths in between (client gone, producer failed, upstream reset) each used to decrement by
hand; one forgotten or doubled decrement skews placement for the rest of the process's life.
``release`` is idempotent, and the context manager releases on any exception.
"""

from __future__ import annotations

from types import TracebackType

from prometheus_client import Gauge

from prfaas_plugin.router.instances import Instance


class Lease:
    def __init__(self, inst: Instance, gauge: Gauge) -> None:
        self.inst = inst
        self._gauge = gauge.labels(inst.cluster, inst.url)
        self.released = False
        self._gen = inst.opened()
        self._gauge.set(inst.inflight)

    def release(self, served: bool = False) -> None:
        """Give the hold back (once; later calls do nothing). ``served``: the instance answered."""
        if self.released:
            return
        self.released = True
        self.inst.closed(self._gen)
        if served:
            self.inst.served += 1
        self._gauge.set(self.inst.inflight)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
