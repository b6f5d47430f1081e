"""The delay line: forwards IP packets between two tun devices after a fixed one-way delay.

Run as its own process (``python -m prfaas_plugin.netemu.delayline``) so that the program under
test never competes with it for a GIL, and at real-time priority where the host allows it: a
wide-area link does not slow down when the hosts at its ends are busy, but a forwarder that waits
for a CPU behind busy processes (vLLM's workers spin on their message queues) adds that wait to
every packet, ACKs included, which TCP then reads as a long or lost round trip. Packets keep their order (constant delay, FIFO per
direction). A Python forwarder moves a few thousand packets per second; with a 65000-byte MTU
that is ~5 Gbit/s, so keep emulated links at 1-4 Gbit/s.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import time

_MAX_PACKET = 65536


def raise_priority() -> str:
    """SCHED_FIFO if permitted, else a lower nice value if permitted, else unchanged: what it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO"
    except (OSError, AttributeError):
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except OSError:
        return "normal"


def forward(fd_a: int, fd_b: int, delay_s: float, max_queued: int = 65536) -> None:
    """Forward until SIGTERM/SIGINT. ``max_queued`` bounds each direction's queue (packets
    beyond it are dropped, as a router with a full buffer would)."""
    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    os.set_blocking(fd_a, False)
    os.set_blocking(fd_b, False)
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {
        fd_b: collections.deque(),  # packets read from A, to be written to B
        fd_a: collections.deque(),
    }
    peer = {fd_a: fd_b, fd_b: fd_a}
    poller = select.poll()
    poller.register(fd_a, select.POLLIN)
    poller.register(fd_b, select.POLLIN)
    # the link owner waits for this (earlier packets would be lost) and keeps the priority
    print(f"ready {raise_priority()}", flush=True)
    while not stopping:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout_ms = 50.0 if not due else max(0.0, (min(due) - now) * 1000.0)
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd, _ev in events:
            out = peer[fd]
            for _ in range(256):  # drain a burst without starving the other direction
                try:
                    pkt = os.read(fd, _MAX_PACKET)
                except BlockingIOError:
                    break
                if len(queues[out]) < max_queued:
                    queues[out].append((now + delay_s, pkt))
        now = time.monotonic()
        for out, q in queues.items():
            while q and q[0][0] <= now:
                _t, pkt = q.popleft()
                try:
                    os.write(out, pkt)
                except (BlockingIOError, OSError):
                    pass  # device queue full or gone: drop, TCP recovers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fd-a", type=int, required=True)
    ap.add_argument("--fd-b", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    args = ap.parse_args()
    forward(args.fd_a, args.fd_b, args.delay_ms / 1000.0)


if __name__ == "__main__":
    main()
