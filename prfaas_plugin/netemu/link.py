"""Two network namespaces joined by an emulated wide-area link (rate + round-trip delay)."""

from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prfaas_plugin.netemu.tun import open_tun

_NS_PATTERN = re.compile(r"^prfaas-(\d+)-(\d+)-[ab]$")
_counter = itertools.count()


@dataclass(frozen=True)
class LinkSpec:
    """A link as an operator would describe it.

    ``tcp_buffer_max_bytes``: None keeps the kernel's stock per-namespace TCP buffer limits
    (wmem max 4 MiB here, which caps one flow near 1.2 Gbit/s at 20 ms); a number raises
    ``tcp_rmem``/``tcp_wmem`` max in both namespaces, as one would tune a real long-haul host.
    """

    rate_gbit: float = 1.0
    rtt_ms: float = 20.0
    mtu: int = 65000
    tcp_buffer_max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.001 <= self.rate_gbit <= 5.0:
            raise ValueError(
                f"rate_gbit must be within 0.001-5 (the delay line tops out near 5.5), got {self.rate_gbit}"
            )
        if not 0.0 <= self.rtt_ms <= 1000.0:
            raise ValueError(f"rtt_ms must be within 0-1000, got {self.rtt_ms}")
        if not 1280 <= self.mtu <= 65000:
            raise ValueError(f"mtu must be within 1280-65000, got {self.mtu}")


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or use loopback with transfer pacing)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (`ip`, `tc`) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    netns_dir = Path("/run/netns")
    return sorted(p.name for p in netns_dir.iterdir()) if netns_dir.is_dir() else []


def cleanup_stale_namespaces() -> list[str]:
    """Delete namespaces left by emulated links whose owning process is gone (a crashed or
    killed run). Returns the names deleted."""
    removed = []
    for name in list_namespaces():
        m = _NS_PATTERN.match(name)
        if m and not _pid_alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


class EmulatedLink:
    """Context manager: ``with EmulatedLink(LinkSpec(1.0, 20.0)) as link: ...``.

    Side A (``link.ns_a`` at ``link.addr_a``) and side B (``link.ns_b`` at ``link.addr_b``) reach
    each other only through the delay line; run programs on a side with ``link.argv(side, argv)``.
    With ``b_in_root=True`` side B is the caller's own namespace (``ns_b`` is None): programs there
    reach side A through the link and still reach loopback services directly — what the demo
    needs (router and local cluster here, the remote PrfaaS cluster behind the link).
    Everything made is removed on exit, on exceptions and on Ctrl-C.
    """

    def __init__(self, spec: LinkSpec, b_in_root: bool = False) -> None:
        self.spec = spec
        self.b_in_root = b_in_root
        n = next(_counter)
        pid = os.getpid()
        self.ns_a = f"prfaas-{pid}-{n}-a"
        self.ns_b: str | None = None if b_in_root else f"prfaas-{pid}-{n}-b"
        tag = f"{pid % 100000}{n % 10}"
        self._dev_a = f"pfa{tag}"
        self._dev_b = f"pfb{tag}"
        subnet = (pid * 7 + n) % 250 + 1
        self.addr_a = f"10.251.{subnet}.1"
        self.addr_b = f"10.251.{subnet}.2"
        self._forwarder: subprocess.Popen[bytes] | None = None
        #: The delay line's scheduling ("SCHED_FIFO", "nice -10" or "normal"), once started.
        self.forwarder_priority = ""
        self._fds: list[int] = []
        self._up = False

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> EmulatedLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        reason = netns_unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot emulate a link here: {reason}")
        cleanup_stale_namespaces()
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        self._up = True

    def _build(self) -> None:
        s = self.spec
        for name in self._namespaces():
            _run(["ip", "netns", "add", name])
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
        for dev, ns, addr in ((self._dev_a, self.ns_a, self.addr_a), (self._dev_b, self.ns_b, self.addr_b)):
            self._fds.append(open_tun(dev))
            ip = ["ip"] if ns is None else ["ip", "-n", ns]
            if ns is not None:
                _run(["ip", "link", "set", dev, "netns", ns])
            _run([*ip, "addr", "add", f"{addr}/30", "dev", dev])
            _run([*ip, "link", "set", dev, "mtu", str(s.mtu), "up"])
            # Rate limit each direction at its sender. The burst must hold at least one packet;
            # the queue holds about 2 RTTs of traffic so TCP sees a bottleneck buffer, not loss.
            rate_bps = s.rate_gbit * 1e9
            burst = max(2 * s.mtu, int(rate_bps / 8 * 0.002))
            limit = max(4 * s.mtu, int(rate_bps / 8 * max(2 * s.rtt_ms, 10.0) / 1000.0))
            tc = ["tc"] if ns is None else ["tc", "-n", ns]
            _run(
                [
                    *tc,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{int(rate_bps)}bit",
                    "burst",
                    str(burst),
                    "limit",
                    str(limit),
                ]
            )
            # Never retune the caller's own namespace: only namespaces this link made.
            if s.tcp_buffer_max_bytes is not None and ns is not None:
                mx = str(int(s.tcp_buffer_max_bytes))
                for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}=4096 131072 {mx}"])
        fd_a, fd_b = self._fds
        self._forwarder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prfaas_plugin.netemu.delayline",
                "--fd-a",
                str(fd_a),
                "--fd-b",
                str(fd_b),
                "--delay-ms",
                str(self.spec.rtt_ms / 2.0),
            ],
            pass_fds=(fd_a, fd_b),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            stdout=subprocess.PIPE,
        )
        # A SYN sent before the forwarder polls is lost and costs a 1 s retransmit: wait for it.
        assert self._forwarder.stdout is not None
        ready, _, _ = select.select([self._forwarder.stdout], [], [], 30.0)
        line = self._forwarder.stdout.readline() if ready else b""
        word, _, priority = line.decode(errors="replace").strip().partition(" ")
        if word != "ready":
            raise RuntimeError(f"delay line did not start (status {self._forwarder.poll()})")
        self.forwarder_priority = priority

    def stop(self) -> None:
        if self._forwarder is not None:
            self._forwarder.terminate()
            try:
                self._forwarder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._forwarder.kill()
                self._forwarder.wait()
            self._forwarder = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()  # closing a non-persistent tun's last fd removes the device
        for ns in self._namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._up = False

    def _namespaces(self) -> list[str]:
        return [ns for ns in (self.ns_a, self.ns_b) if ns is not None]

    # -- use --------------------------------------------------------------------------------------
    def namespace(self, side: str) -> str | None:
        """The namespace of side ``a`` or ``b`` (None: the caller's own)."""
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        return self.ns_a if side == "a" else self.ns_b

    def argv(self, side: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so it runs inside side ``a`` or ``b``."""
        ns = self.namespace(side)
        return list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]

    @property
    def running(self) -> bool:
        return self._up and self._forwarder is not None and self._forwarder.poll() is None
