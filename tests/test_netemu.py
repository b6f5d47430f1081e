"""The emulated wide-area link: real namespaces, real TCP, measured delay and rate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from prfaas_plugin.netemu import EmulatedLink, LinkSpec, cleanup_stale_namespaces, netns_unavailable_reason
from prfaas_plugin.netemu.link import list_namespaces

pytestmark = pytest.mark.netns
_REASON = netns_unavailable_reason()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"no network namespaces: {_REASON}")

_SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        buf = bytearray(1 << 20)
        while c.recv_into(buf):
            pass
        c.close()
    """
)

_CLIENT = textwrap.dedent(
    """
    import json, socket, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rtts = []
    for _ in range(5):
        t = time.perf_counter(); c = socket.create_connection((host, port)); rtts.append(time.perf_counter() - t); c.close()
    c = socket.create_connection((host, port)); data = bytes(1 << 20); sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c.sendall(data); sent += len(data)
    c.shutdown(socket.SHUT_WR); c.recv(1); el = time.perf_counter() - t0
    print(json.dumps({"rtt_s": sorted(rtts)[2], "gbit": sent * 8 / el / 1e9}))
    """
)


def test_spec_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="rate_gbit"):
        LinkSpec(rate_gbit=50)
    with pytest.raises(ValueError, match="rtt_ms"):
        LinkSpec(rtt_ms=-1)
    with pytest.raises(ValueError, match="mtu"):
        LinkSpec(mtu=100)


@needs_netns
def test_link_has_the_asked_delay_and_rate_and_leaves_nothing() -> None:
    spec = LinkSpec(rate_gbit=0.2, rtt_ms=20.0, tcp_buffer_max_bytes=16 << 20)
    with EmulatedLink(spec) as link:
        assert link.running
        server = subprocess.Popen(
            link.argv("b", [sys.executable, "-c", _SERVER, link.addr_b, "5201"]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            out = subprocess.run(
                link.argv("a", [sys.executable, "-c", _CLIENT, link.addr_b, "5201", "2.0"]),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            m = json.loads(out.stdout)
        finally:
            server.kill()
            server.wait()
        names = (link.ns_a, link.ns_b)
    # TCP connect = one round trip through the delay line.
    assert 0.018 <= m["rtt_s"] <= 0.060, m
    # Goodput sits just under the tbf rate (headers, slow start), never above it.
    assert 0.6 * spec.rate_gbit <= m["gbit"] <= 1.05 * spec.rate_gbit, m
    assert not set(names) & set(list_namespaces())


@needs_netns
def test_the_delay_line_runs_ahead_of_busy_processes_where_allowed() -> None:
    """Packets (ACKs too) must not queue behind the CPU load of the programs under test: the
    forwarder asks for SCHED_FIFO and reports what it got; as root here it gets it."""
    import os

    with EmulatedLink(LinkSpec(rate_gbit=0.1, rtt_ms=2.0)) as link:
        assert link._forwarder is not None
        policy = os.sched_getscheduler(link._forwarder.pid)
        got = link.forwarder_priority
    assert got in ("SCHED_FIFO", "nice -10", "normal")
    if os.geteuid() == 0:
        assert got == "SCHED_FIFO" and policy == os.SCHED_FIFO
    else:
        assert policy == os.SCHED_OTHER


def test_delay_line_priority_falls_back_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from prfaas_plugin.netemu import delayline

    def refuse(*_a: object) -> None:
        raise PermissionError("not allowed")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(os, "nice", refuse)
    assert delayline.raise_priority() == "normal"
    monkeypatch.setattr(os, "nice", lambda inc: inc)
    assert delayline.raise_priority() == "nice -10"


@needs_netns
def test_stale_namespaces_of_dead_processes_are_removed() -> None:
    dead_pid = 2**22 - 7  # above pid_max defaults: no such process
    name = f"prfaas-{dead_pid}-0-a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in cleanup_stale_namespaces()
        assert name not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@needs_netns
def test_side_b_can_be_the_callers_namespace() -> None:
    import socket
    import time

    with EmulatedLink(LinkSpec(rate_gbit=0.5, rtt_ms=30.0), b_in_root=True) as link:
        assert link.ns_b is None and link.argv("b", ["true"]) == ["true"]
        server = subprocess.Popen(
            link.argv("a", [sys.executable, "-c", _SERVER, link.addr_a, "5202"]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            t0 = time.perf_counter()
            socket.create_connection((link.addr_a, 5202), timeout=5).close()
            rtt = time.perf_counter() - t0
        finally:
            server.kill()
            server.wait()
        dev = link._dev_b
    assert 0.028 <= rtt <= 0.080
    assert subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode != 0
