"""Which CPUs the transfer threads run on: the engine's whole set, not the core(s) an engine
pinned its compute thread to.

A thread starts with its creator's CPU mask. vLLM's CPU workers pin their main thread for OpenMP
(``VLLM_CPU_OMP_THREADS_BIND`` becomes ``OMP_PLACES``/``OMP_PROC_BIND``, which libgomp applies to
the thread that loads it), so the receiver, sender, gRPC and data-plane threads the connector
starts from that thread would all share its core(s). The main thread of a decode worker waiting
for KV busy-polls vLLM's shared-memory queue (the engine keeps stepping so the connector can
report finished loads), so the transfer threads would get a slice of one busy core while the
process may run anywhere else. Pinning is for the compute threads; transfer threads take the set
of the process that started the engine (the worker's parent, where vLLM applied no OpenMP
binding), or ``PRFAAS_TRANSFER_CPUS``: a CPU list such as ``0-3,8`` (e.g. the cores vLLM reserves
and leaves out of every rank's OpenMP list) or ``inherit`` to keep the creator's mask.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

ENV = "PRFAAS_TRANSFER_CPUS"


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-3,8"`` -> {0, 1, 2, 3, 8}; a clear error for anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{ENV}={text!r}: expected a CPU list like '0-3,8' or 'inherit'") from None
        if a < 0 or b < a:
            raise ValueError(f"{ENV}={text!r}: {part!r} is not a CPU range")
        cpus.update(range(a, b + 1))
    return frozenset(cpus)


@functools.lru_cache(maxsize=1)
def transfer_cpus() -> frozenset[int] | None:
    """The CPU set for transfer threads, or None to leave masks alone (``inherit``, or a
    platform without thread affinity)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    text = os.environ.get(ENV, "").strip()
    if text == "inherit":
        return None
    if text:
        return parse_cpu_list(text)
    try:
        return frozenset(os.sched_getaffinity(0) | os.sched_getaffinity(os.getppid()))
    except OSError:  # the parent is gone or not ours to read: keep the inherited mask
        return None


def use_transfer_cpus() -> None:
    """Move the calling thread onto the transfer CPUs (first thing in a transfer thread)."""
    cpus = transfer_cpus()
    if cpus is None:
        return
    with contextlib.suppress(OSError):  # CPUs outside this cgroup's cpuset: keep the mask
        if os.sched_getaffinity(0) != cpus:
            os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def transfer_cpus_while() -> Iterator[None]:
    """Run the block on the transfer CPUs, then restore the caller's mask: threads started inside
    it (gRPC's own threads included) inherit the transfer set, the caller keeps its pinning."""
    cpus = transfer_cpus()
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    use_transfer_cpus()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
