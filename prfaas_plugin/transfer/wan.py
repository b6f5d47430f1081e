"""An emulated cross-datacenter link for benchmarks: two network namespaces joined by tun
devices and a user-space delay line, with ``tbf`` setting the rate.

netem is not built into this kernel (``Specified qdisc kind is unknown``), so the delay comes
from a forwarder process that holds every IP packet for half the RTT before writing it to the
other namespace's tun. ACKs are delayed too, so window and bandwidth-delay effects are real.
The forwarder opens one tun inside each namespace with ``setns(2)`` (per thread, via ctypes,
as Python 3.11 has no ``os.setns``). A Python forwarder tops out near 5 Gbit/s: keep emulated
links at a few Gbit/s.

    with WanLink(rate_gbit=2.0, rtt_ms=20.0) as link:
        link.run_in("a", [...])   # sender side, reaches link.b_addr
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Optional

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


class WanUnavailable(RuntimeError):
    """This host cannot build the emulated link (not root, no netns, no tun, no tbf...)."""


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise WanUnavailable(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


class WanLink:
    def __init__(self, rate_gbit: float = 2.0, rtt_ms: float = 20.0, mtu: int = 65000,
                 subnet: str = "10.251.0") -> None:
        if os.geteuid() != 0:
            raise WanUnavailable("needs root (network namespaces, tun, tc)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise WanUnavailable("needs iproute2 (`ip`, `tc`)")
        if not os.path.exists("/dev/net/tun"):
            raise WanUnavailable("no /dev/net/tun")
        tag = f"{os.getpid() % 100000}"
        self.ns = {"a": f"prfaas-a{tag}", "b": f"prfaas-b{tag}"}
        self.dev = {"a": f"pfa{tag}", "b": f"pfb{tag}"}
        self.addr = {"a": f"{subnet}.1", "b": f"{subnet}.2"}
        self.rate_gbit, self.rtt_ms, self.mtu = rate_gbit, rtt_ms, mtu
        self._fwd: Optional[subprocess.Popen] = None

    @property
    def b_addr(self) -> str:
        return self.addr["b"]

    def __enter__(self) -> "WanLink":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _setup(self) -> None:
        for side in ("a", "b"):
            _run(["ip", "netns", "add", self.ns[side]])
            _run(["ip", "-n", self.ns[side], "link", "set", "lo", "up"])
        self._fwd = subprocess.Popen(
            [sys.executable, "-m", "prfaas_plugin.transfer.wan", "--forward", self.ns["a"], self.dev["a"],
             self.ns["b"], self.dev["b"], str(self.rtt_ms / 2000.0)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        line = self._fwd.stdout.readline() if self._fwd.stdout else ""
        if line.strip() != "ready":
            err = self._fwd.stderr.read() if self._fwd.stderr else ""
            raise WanUnavailable(f"delay-line forwarder did not start: {line.strip()} {err.strip()[-300:]}")
        for side in ("a", "b"):
            ns, dev = self.ns[side], self.dev[side]
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr[side]}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up"])
            # burst must hold a few max-size packets; latency bounds the tbf queue.
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                  "rate", f"{self.rate_gbit}gbit", "burst", "1mb", "latency", "200ms"])

    def close(self) -> None:
        if self._fwd is not None:
            self._fwd.kill()
            self._fwd.wait()
            self._fwd = None
        for side in ("a", "b"):
            _run(["ip", "netns", "del", self.ns[side]], check=False)

    def prefix(self, side: str) -> list[str]:
        """Command prefix that runs a program inside namespace ``side`` ("a" or "b")."""
        return ["ip", "netns", "exec", self.ns[side]]

    def sysctl(self, side: str, key: str) -> str:
        return _run(self.prefix(side) + ["sysctl", "-n", key]).stdout.strip()

    def tcp_connect_ms(self, port: int = 9) -> float:
        """RTT as seen by a TCP handshake from a to b (a refused connect takes one RTT)."""
        code = ("import socket,time;s=socket.socket();t=time.monotonic();"
                f"r=s.connect_ex(('{self.b_addr}',{port}));print((time.monotonic()-t)*1e3)")
        vals = [float(_run(self.prefix("a") + [sys.executable, "-c", code]).stdout) for _ in range(3)]
        return sorted(vals)[1]

    def iperf3(self, streams: int, seconds: float) -> float:
        """Receiver-side goodput of ``iperf3 -P streams`` from a to b, in Gbit/s."""
        if shutil.which("iperf3") is None:
            raise WanUnavailable("iperf3 is not installed (apt-get install iperf3)")
        srv = subprocess.Popen(self.prefix("b") + ["iperf3", "-s", "-1", "-p", "5299"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            out = _run(self.prefix("a") + ["iperf3", "-c", self.b_addr, "-p", "5299", "-P", str(streams),
                                           "-t", str(seconds), "-J"])
            return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        finally:
            srv.kill()
            srv.wait()


# ---------------------------------------------------------------------------------------------
# The forwarder process.
# ---------------------------------------------------------------------------------------------
def _open_tun_in(ns: str, dev: str) -> int:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    nsfd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(nsfd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
    finally:
        os.close(nsfd)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", dev.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _pipe(src: int, dst: int, delay_s: float) -> None:
    """Packets from ``src`` reach ``dst`` ``delay_s`` later, in order (constant delay = FIFO)."""
    q: collections.deque[tuple[float, bytes]] = collections.deque()
    cond = threading.Condition()

    def reader() -> None:
        while True:
            pkt = os.read(src, 65536)
            with cond:
                q.append((time.monotonic() + delay_s, pkt))
                cond.notify()

    def writer() -> None:
        while True:
            with cond:
                while not q:
                    cond.wait()
                due, pkt = q[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with cond:
                q.popleft()
            try:
                os.write(dst, pkt)
            except OSError:
                pass  # interface going down

    for fn in (reader, writer):
        threading.Thread(target=fn, daemon=True).start()


def _forward(ns_a: str, dev_a: str, ns_b: str, dev_b: str, delay_s: float) -> None:
    fa = _open_tun_in(ns_a, dev_a)
    fb = _open_tun_in(ns_b, dev_b)
    _pipe(fa, fb, delay_s)
    _pipe(fb, fa, delay_s)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--forward":
        _forward(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]))
    else:
        raise SystemExit("usage: python -m prfaas_plugin.transfer.wan --forward NS_A DEV_A NS_B DEV_B DELAY_S")
