"""Measuring an emulated link from inside its namespaces: handshake RTT, sysctls, iperf3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from prfaas_plugin.netemu.link import EmulatedLink


def tcp_connect_ms(link: EmulatedLink, port: int = 9) -> float:
    """Median of 3 TCP handshakes from side a to side b (a refused connect takes one RTT)."""
    code = (
        "import socket,time;s=socket.socket();t=time.monotonic();"
        f"s.connect_ex(('{link.addr_b}',{port}));print((time.monotonic()-t)*1e3)"
    )
    vals = [
        float(
            subprocess.run(
                link.argv("a", [sys.executable, "-c", code]), capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(3)
    ]
    return sorted(vals)[1]


def sysctl(link: EmulatedLink, side: str, key: str) -> str:
    return subprocess.run(
        link.argv(side, ["sysctl", "-n", key]), capture_output=True, text=True, check=True
    ).stdout.strip()


def iperf3_gbps(link: EmulatedLink, streams: int, seconds: float, port: int = 5299) -> float:
    """Receiver-side goodput of ``iperf3 -P streams`` from a to b, in Gbit/s."""
    if shutil.which("iperf3") is None:
        raise RuntimeError("iperf3 is not installed (apt-get install iperf3)")
    srv = subprocess.Popen(
        link.argv("b", ["iperf3", "-s", "-1", "-p", str(port)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        out = subprocess.run(
            link.argv(
                "a", ["iperf3", "-c", link.addr_b, "-p", str(port), "-P", str(streams), "-t", str(seconds), "-J"]
            ),
            capture_output=True,
            text=True,
            check=True,
        )
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.kill()
        srv.wait()
