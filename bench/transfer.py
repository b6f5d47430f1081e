"""Transfer engine benchmarks (issue 3). Prints a table, appends to BENCHMARKS.md.

  python bench/transfer.py                  # cases 1, 3 and 2 (2 needs root + netns)
  python bench/transfer.py --quick --json   # case 4: case 1 in < 60 s, one JSON object
  python bench/transfer.py --cases 2        # emulated 2 Gbit/s, 20 ms RTT link only

Case 1: loopback goodput of the engine against a raw multi-socket ceiling (``sendall`` /
``recv_into`` on N connections, no framing, no checksum) measured in the same run with the same
process layout (sender in this process, receiver in a child process), plus gRPC-only figures.
Case 2: netns + tbf + tun delay line; engine with 1 and N connections against ``iperf3 -P N``.
Case 3: layer-wise pipelining tail against one layer's wire time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prfaas_plugin.transfer import (  # noqa: E402
    GrpcTcpReceiver,
    GrpcTcpSender,
    ItemSpec,
    LayoutFingerprint,
    ReceiverConfig,
    SenderConfig,
    TransferManifest,
)

FP = LayoutFingerprint({"bench": 1})
GB = 1e9


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def _touched(n: int, fill: int = 0) -> np.ndarray:
    a = np.empty(n, dtype=np.uint8)
    a.fill(fill)  # fault every page in before timing
    return a


# ---------------------------------------------------------------------------------------------
# Child processes: a raw-socket sink and an engine receiver.
# ---------------------------------------------------------------------------------------------
def serve_raw(host: str, conns: int, per_conn: int, rounds: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, 0))
    ls.listen(conns)
    print(json.dumps({"port": ls.getsockname()[1]}), flush=True)
    socks = [ls.accept()[0] for _ in range(conns)]
    dst = _touched(per_conn * conns)

    def run(i: int, s: socket.socket) -> None:
        view = memoryview(dst)[i * per_conn:(i + 1) * per_conn]
        for _ in range(rounds):
            got = 0
            while got < per_conn:
                n = s.recv_into(view[got:], per_conn - got)
                if n == 0:
                    return
                got += n
            s.sendall(b"k")

    ts = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(socks)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


class _ReuseSink:
    """Hands out the same pre-faulted buffers for every round (what a KV pool does)."""

    def __init__(self, sizes: list[int]) -> None:
        self.bufs = [_touched(n) for n in sizes]

    def buffer_for(self, item: ItemSpec) -> memoryview:
        return memoryview(self.bufs[int(item.name[1:])])

    def item_done(self, item: ItemSpec) -> None:
        pass


def serve_engine(host: str, secret: str, rounds: int, sizes: list[int]) -> None:
    rx = GrpcTcpReceiver(ReceiverConfig(listen=f"{host}:0"))
    sink = _ReuseSink(sizes)
    handles = [rx.expect(f"b{r}", f"{secret}-{r}", FP, sink, deadline_s=900) for r in range(rounds)]
    print(json.dumps({"endpoint": rx.endpoint}), flush=True)
    done_at: list[Optional[float]] = []
    for h in handles:
        try:
            h.done.result(timeout=900)
            done_at.append(time.monotonic())
        except Exception as e:  # report, the parent decides
            done_at.append(None)
            log("receiver:", repr(e))
    print(json.dumps({"done_at": done_at}), flush=True)
    rx.close()


# ---------------------------------------------------------------------------------------------
# Parent-side drivers.
# ---------------------------------------------------------------------------------------------
def _child(args: list[str], netns: Optional[str] = None) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


class RawRun:
    """The ceiling: N plain connections, ``sendall`` of one slice each, ``recv_into`` at the
    far end, a 1-byte receipt per connection per round. No framing, no checksum."""

    def __init__(self, host: str, total: int, conns: int, rounds: int, netns: Optional[str] = None) -> None:
        self.per = total // conns
        self.conns = conns
        self.child = _child(["--serve-raw", host, str(conns), str(self.per), str(rounds)], netns)
        port = json.loads(self.child.stdout.readline())["port"]
        self.src = _touched(self.per * conns, 7)
        self.socks = [socket.create_connection((host, port)) for _ in range(conns)]

    def round(self) -> float:
        t0 = time.monotonic()

        def push(i: int) -> None:
            self.socks[i].sendall(memoryview(self.src)[i * self.per:(i + 1) * self.per])
            self.socks[i].recv(1)

        ts = [threading.Thread(target=push, args=(i,)) for i in range(self.conns)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return self.per * self.conns / (time.monotonic() - t0)

    def finish(self) -> None:
        for s in self.socks:
            s.close()
        self.child.wait(30)


class EngineRun:
    """The engine: sender here, receiver in a child with every round's session announced."""

    def __init__(self, host: str, sizes: list[int], rounds: int, cfg: SenderConfig,
                 netns: Optional[str] = None) -> None:
        self.secret = secrets.token_hex(16)
        self.sizes = sizes
        self.child = _child(["--serve-engine", host, self.secret, str(rounds), json.dumps(sizes)], netns)
        self.endpoint = json.loads(self.child.stdout.readline())["endpoint"]
        self.srcs = [_touched(n, 7) for n in sizes]
        self.items = tuple(ItemSpec(f"L{i}", n, i) for i, n in enumerate(sizes))
        self.tx = GrpcTcpSender(cfg)
        self.r = 0
        self.timings: list[dict[str, float]] = []

    def round(self, layer_gap_s: float = 0.0) -> float:
        m = TransferManifest(f"b{self.r}", self.items, FP)
        t0 = time.monotonic()
        h = self.tx.open(self.endpoint, m, f"{self.secret}-{self.r}", deadline_s=600)
        self.r += 1
        for i, s in enumerate(self.srcs):
            if layer_gap_s:
                time.sleep(layer_gap_s)  # the layer's "compute"
            h.send(f"L{i}", s)
        t_last = time.monotonic()
        h.done.result(timeout=600)
        t1 = time.monotonic()
        self.timings.append({"t0": t0, "t_last_produced": t_last, "t_sender_done": t1})
        return sum(self.sizes) / (t1 - t0)

    def finish(self) -> dict[str, Any]:
        stats = self.tx.stats()
        self.tx.close()
        out = json.loads(self.child.stdout.readline())
        for t, d in zip(self.timings, out["done_at"]):
            t["t_receiver_done"] = d if d is not None else float("nan")
        self.child.wait(30)
        return stats


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def case1(quick: bool, conns_list: list[int]) -> dict[str, Any]:
    total = (128 if quick else 256) << 20
    rounds = 4 if quick else 7
    item = 32 << 20
    sizes = [item] * (total // item)
    rows = []
    for n in conns_list:
        raw = RawRun("127.0.0.1", total, n, rounds + 1)
        eng = EngineRun("127.0.0.1", sizes, rounds + 1, SenderConfig(connections=n))
        raw.round(), eng.round()  # warm-up: connections, page faults, thread pools
        rr, er = [], []
        for _ in range(rounds):  # alternate so both see the same background load
            rr.append(raw.round())
            er.append(eng.round())
        raw.finish()
        eng.finish()
        rows.append({"connections": n, "ceiling_gbps": _med(rr) * 8 / GB, "goodput_gbps": _med(er) * 8 / GB,
                     "ratio": _med(er) / _med(rr), "raw_runs": [round(r * 8 / GB, 2) for r in rr],
                     "engine_runs": [round(r * 8 / GB, 2) for r in er]})
        log(f"case1 n={n}: ceiling {rows[-1]['ceiling_gbps']:.2f} engine {rows[-1]['goodput_gbps']:.2f} Gbit/s "
            f"ratio {rows[-1]['ratio']:.2f}")
    grpc_rows = []
    if not quick:
        for n in (1, 2):
            g = EngineRun("127.0.0.1", [item] * 2, 4, SenderConfig(connections=n, data_plane="grpc"))
            runs = [g.round() for _ in range(4)][1:]
            g.finish()
            grpc_rows.append({"connections": n, "goodput_gbps": _med(runs) * 8 / GB})
            log(f"case1 grpc data plane n={n}: {grpc_rows[-1]['goodput_gbps']:.2f} Gbit/s")
    return {"rows": rows, "grpc": grpc_rows, "total_bytes": total, "rounds": rounds}


def case3(conns: int) -> dict[str, Any]:
    layer, layers = 16 << 20, 12
    # One layer's wire time, in this run: the median of single-layer requests.
    one = EngineRun("127.0.0.1", [layer], 6, SenderConfig(connections=conns))
    single = [one.round() for _ in range(6)][1:]
    one.finish()
    wire_s = layer / _med(single)
    gap = 2.0 * wire_s  # compute slower than the wire: the link is not saturated
    run = EngineRun("127.0.0.1", [layer] * layers, 3, SenderConfig(connections=conns))
    for _ in range(3):
        run.round(layer_gap_s=gap)
    run.finish()
    tails = [t["t_receiver_done"] - t["t_last_produced"] for t in run.timings]
    tails_tx = [t["t_sender_done"] - t["t_last_produced"] for t in run.timings]
    res = {"layer_bytes": layer, "layers": layers, "gap_s": gap, "wire_s": wire_s,
           "tail_s": _med(tails), "tail_sender_s": _med(tails_tx), "ratio": _med(tails) / wire_s}
    log(f"case3: wire {wire_s*1e3:.1f} ms, tail {res['tail_s']*1e3:.1f} ms, ratio {res['ratio']:.2f}")
    return res


def case2(conns: int, seconds: float) -> dict[str, Any]:
    from prfaas_plugin.transfer.wan import WanLink, WanUnavailable

    try:
        link = WanLink(rate_gbit=2.0, rtt_ms=20.0)
    except WanUnavailable as e:
        log(f"case2 skipped: {e}")
        return {"skipped": str(e)}
    res: dict[str, Any] = {"rate_gbit": 2.0, "rtt_ms": 20.0, "connections": conns}
    try:
        with link:
            res["ping_rtt_ms"] = link.ping_ms()
            total = int(2.0e9 / 8 * seconds * 0.9)
            item = 16 << 20
            sizes = [item] * max(1, total // item)
            for n in (1, conns):
                rates, tm = engine_run(link.b_addr, sizes, 2, SenderConfig(connections=n), netns_sender(link), )
                res[f"engine_{n}_gbps"] = _med(rates) * 8 / GB
                log(f"case2 engine n={n}: {res[f'engine_{n}_gbps']:.2f} Gbit/s")
            res[f"iperf3_P{conns}_gbps"] = link.iperf3(conns, seconds)
            res["iperf3_P1_gbps"] = link.iperf3(1, seconds)
            log(f"case2 iperf3: {res}")
    except WanUnavailable as e:
        res["skipped"] = str(e)
    return res


def netns_sender(link: Any) -> Optional[str]:
    return None  # placeholder replaced in main() (the sender runs in netns a via re-exec)


def append_benchmarks(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    with open(path, "a") as f:
        f.write(text)


def machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} vCPU, {platform.processor() or platform.machine()}, Python {platform.python_version()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="case 1 only, small, < 60 s")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--cases", default="1,3,2")
    ap.add_argument("--connections", default="1,2,4", help="case 1 connection counts")
    ap.add_argument("--wan-connections", type=int, default=4)
    ap.add_argument("--wan-seconds", type=float, default=6.0)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--serve-raw", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--serve-engine", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_raw:
        h, c, p, r = a.serve_raw
        return serve_raw(h, int(c), int(p), int(r))
    if a.serve_engine:
        h, s, r, sz = a.serve_engine
        return serve_engine(h, s, int(r), json.loads(sz))
    raise SystemExit("unfinished")


if __name__ == "__main__":
    main()
