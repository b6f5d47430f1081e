"""Transfer threads leave a pinned creator's core: the CPU set they take, and that threads started
from a pinned thread (a vLLM CPU worker's OpenMP-bound main thread) get it."""

from __future__ import annotations

import os
import threading

import pytest

from prfaas_plugin.transfer import affinity

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2+ CPUs and affinity"
)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(affinity.ENV, raising=False)
    affinity.transfer_cpus.cache_clear()
    yield
    affinity.transfer_cpus.cache_clear()


def _in_thread(fn, *args):
    """Run ``fn`` in a new thread and return its result (masks are per thread)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join(30)
    return out[0]


def _pinned(fn):
    """``fn()`` in a thread pinned to one CPU, as an OpenMP-bound worker's main thread is."""

    def run():
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        return fn()

    return _in_thread(run)


def test_parse_cpu_list():
    assert affinity.parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert affinity.parse_cpu_list(" 5 ") == {5}
    for bad in ("", "a", "3-1", "0,,1", "-1"):
        with pytest.raises(ValueError, match=affinity.ENV):
            affinity.parse_cpu_list(bad)


def test_default_is_the_parent_set_and_inherit_keeps_masks(monkeypatch):
    whole = os.sched_getaffinity(0)
    assert affinity.transfer_cpus() == whole | os.sched_getaffinity(os.getppid())
    affinity.transfer_cpus.cache_clear()
    monkeypatch.setenv(affinity.ENV, "inherit")
    assert affinity.transfer_cpus() is None
    one = {min(whole)}
    assert _pinned(lambda: (affinity.use_transfer_cpus(), os.sched_getaffinity(0))[1]) == one


def test_a_thread_on_a_pinned_core_moves_to_the_transfer_set(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    monkeypatch.setenv(affinity.ENV, f"{cpus[0]},{cpus[1]}")
    assert _pinned(lambda: (affinity.use_transfer_cpus(), os.sched_getaffinity(0))[1]) == set(cpus)


def test_threads_started_inside_the_block_inherit_it_and_the_caller_keeps_its_pin():
    whole = affinity.transfer_cpus()

    def run():
        before = os.sched_getaffinity(0)
        with affinity.transfer_cpus_while():
            child = _in_thread(os.sched_getaffinity, 0)
        return before, child, os.sched_getaffinity(0)

    before, child, after = _pinned(run)
    assert len(before) == 1 and after == before
    assert child == whole


def test_a_receiver_built_on_a_pinned_thread_serves_from_the_transfer_set():
    """The connector builds its receiver on the worker's pinned main thread; the receiver's own
    threads (accept loop, reaper, gRPC handlers) must not share that one core."""
    from prfaas_plugin.transfer.config import ReceiverConfig
    from prfaas_plugin.transfer.receiver import GrpcTcpReceiver

    whole = affinity.transfer_cpus()

    def run():
        with affinity.transfer_cpus_while():
            rx = GrpcTcpReceiver(ReceiverConfig(listen="127.0.0.1:0"))
        try:
            masks = {t.name: os.sched_getaffinity(t.native_id) for t in rx._threads}
            return masks, os.sched_getaffinity(0)
        finally:
            rx.close()

    masks, caller = _pinned(run)
    assert len(caller) == 1
    assert masks and all(m == whole for m in masks.values()), masks
