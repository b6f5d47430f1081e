"""Router under load (issue 8): 1,000 concurrent streaming requests through the router against
fake engines, then a soak at steady load while one of the two decode instances flaps (killed,
restarted). Reports errors (injected vs other), latency, and the router's RSS at start and end.
Appends to BENCHMARKS.md.

    python bench/router_load.py [--burst 1000] [--soak-s 600] [--soak-streams 50] [--no-append]

The fake engines stream 20 tokens 50 ms apart (a decoding engine). A stream cut because its
instance was killed under it is an *injected* error; every other non-200 answer or broken
stream counts as an error of the router.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from _common import ROOT, append_benchmarks
from router import _wait, build_bpe_tokenizer  # the router bench's helpers

from prfaas_plugin.demo.ports import free_port

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fake(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "_fake_openai.py"), str(port)], env=ENV)


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.injected = 0
        self.latencies: list[float] = []


async def one(session: aiohttp.ClientSession, url: str, i: int, tally: Tally, kills: list[float]) -> None:
    body = {"model": "bench", "prompt": f"hello {i}", "max_tokens": 20, "stream": True, "bench_token_delay_s": 0.05}
    t0 = time.monotonic()
    try:
        async with session.post(url, json=body) as r:
            text = b""
            async for chunk in r.content.iter_any():
                text += chunk
            status = r.status
        complete = b"[DONE]" in text
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        status, complete = type(exc).__name__, False
    t1 = time.monotonic()
    if status == 200 and complete:
        tally.ok += 1
        tally.latencies.append(t1 - t0)
    elif any(t0 - 0.5 <= k <= t1 + 0.5 for k in kills):
        tally.injected += 1  # its instance was killed while it ran
    else:
        key = f"{status}{'' if complete else ' (truncated)'}"
        tally.errors[key] = tally.errors.get(key, 0) + 1


async def burst(url: str, n: int) -> tuple[Tally, float]:
    tally = Tally()
    conn = aiohttp.TCPConnector(limit=n + 8)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
        t0 = time.monotonic()
        await asyncio.gather(*(one(s, url, i, tally, []) for i in range(n)))
        return tally, time.monotonic() - t0


async def soak(url: str, streams: int, seconds: float, flap: Flapper) -> Tally:
    tally = Tally()
    end = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=streams + 8)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def worker(w: int) -> None:
            i = 0
            while time.monotonic() < end:
                await one(s, url, w * 1_000_000 + i, tally, flap.kills)
                i += 1

        await asyncio.gather(flap.run(end), *(worker(w) for w in range(streams)))
    return tally


class Flapper:
    """Kills the second decode instance every ``period_s`` and restarts it ``down_s`` later."""

    def __init__(self, port: int, period_s: float, down_s: float) -> None:
        self.port, self.period_s, self.down_s = port, period_s, down_s
        self.proc = fake(port)
        self.kills: list[float] = []

    async def run(self, end: float) -> None:
        while time.monotonic() + self.period_s < end:
            await asyncio.sleep(self.period_s - self.down_s)
            self.kills.append(time.monotonic())
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            await asyncio.sleep(self.down_s)
            self.proc = fake(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--soak-streams", type=int, default=50)
    ap.add_argument("--flap-every-s", type=float, default=30)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prfaas-router-load-"))
    tok_dir, _ = build_bpe_tokenizer(tmp / "tok")
    d1, d2, r_port = free_port(), free_port(), free_port()
    steady = fake(d1)
    flap = Flapper(d2, args.flap_every_s, down_s=min(10.0, args.flap_every_s / 3))
    cfg = {
        "model": "bench",
        "tokenizer": str(tok_dir),
        "block_size": 16,
        "threshold": {"mode": "fixed", "tokens": 1e6},
        "timeouts": {"health_every_s": 1.0},
        "clusters": [
            {
                "name": "local",
                "kind": "local",
                "both": [
                    {"url": f"http://127.0.0.1:{d1}", "kv_endpoint": "127.0.0.1:15600"},
                    {"url": f"http://127.0.0.1:{d2}", "kv_endpoint": "127.0.0.1:15601"},
                ],
            }
        ],
    }
    (tmp / "router.yaml").write_text(yaml.safe_dump(cfg))
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prfaas_plugin",
            "router",
            "--config",
            str(tmp / "router.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(r_port),
            "--log-level",
            "error",
        ],
        env=ENV,
    )
    url = f"http://127.0.0.1:{r_port}/v1/completions"
    try:
        for port in (d1, d2, r_port):
            _wait(f"http://127.0.0.1:{port}/health")
        rss0 = rss_mib(router.pid)
        b, wall = asyncio.run(burst(url, args.burst))
        rss_burst = rss_mib(router.pid)
        s = asyncio.run(soak(url, args.soak_streams, args.soak_s, flap))
        rss1 = rss_mib(router.pid)
    finally:
        for p in (router, steady):
            p.terminate()
            p.wait(timeout=10)
        flap.stop()

    def errs(t: Tally) -> str:
        return ", ".join(f"{k}: {v}" for k, v in t.errors.items()) or "0"

    body = "\n".join(
        [
            "| phase | requests ok | injected (stream cut by a kill) | other errors | latency p50 / p99 s | router RSS MiB |",
            "|---|---|---|---|---|---|",
            f"| {args.burst} concurrent streams at once ({wall:.1f} s) | {b.ok} | 0 | {errs(b)} | "
            f"{pct(b.latencies, 0.5):.2f} / {pct(b.latencies, 0.99):.2f} | {rss0:.0f} -> {rss_burst:.0f} |",
            f"| soak {args.soak_s:.0f} s, {args.soak_streams} streams, decode #2 killed every {args.flap_every_s:.0f} s "
            f"({len(flap.kills)} kills) | {s.ok} | {s.injected} | {errs(s)} | "
            f"{pct(s.latencies, 0.5):.2f} / {pct(s.latencies, 0.99):.2f} | {rss_burst:.0f} -> {rss1:.0f} |",
        ]
    )
    print(body)
    if not args.no_append:
        append_benchmarks(
            "Router under load and a flapping backend (issue 8)",
            body,
            notes="fake engines streaming 20 tokens 50 ms apart; router, engines and client on the same "
            "2 cores; a request counts as injected when an instance kill fell within its lifetime",
        )


if __name__ == "__main__":
    main()
