"""Pick a free TCP port that nothing else will take before the server that needs it binds it.

``bind(("", 0))`` returns a port from the kernel's *ephemeral* range, the same range every
outgoing connection and every other ``bind(0)`` draws from. Between the moment a test or the demo
picks such a port and the moment a vLLM server binds it (tens of seconds on CPU), some other
socket (vLLM's own ZMQ/TCPStore ports, an HTTP health probe's client side) can land on it, and the
server fails with EADDRINUSE. Ports below the ephemeral range are never handed out implicitly, so
picking one there and checking it is free leaves only another explicit picker as a competitor.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 20000
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's implicit port range (Linux default 32768-60999)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(rng: random.Random | None = None) -> int:
    """A port that is free now, outside the ephemeral range, and not returned before by this
    process. Falls back to a kernel-chosen port only if the range below is exhausted."""
    rng = rng or random.SystemRandom()
    lo, _ = ephemeral_range()
    top = lo - 1
    if top - _LOWEST >= 100:
        for _ in range(200):
            port = rng.randint(_LOWEST, top)
            if port not in _handed_out and _is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port
