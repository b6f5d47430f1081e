"""What securing the KV channel costs (issue 8): transfer-engine goodput on loopback without TLS,
with TLS and with mutual TLS, measured in one run with rounds alternating between the three so a
shared host's load drift hits all of them alike. Appends to BENCHMARKS.md.

    python bench/tls.py [--mib 128] [--rounds 8] [--connections 4] [--no-append]

Sender and receiver run in this one process (the receiver's threads and the sender's threads
share its GIL, which OpenSSL and socket I/O release), with a throwaway PKI generated at start
(EC P-256 keys, TLS 1.3 as negotiated by Python's ssl defaults).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, append_benchmarks

from prfaas_plugin.transfer import (
    GrpcTcpReceiver,
    GrpcTcpSender,
    ItemSpec,
    LayoutFingerprint,
    ReceiverConfig,
    SenderConfig,
    TlsConfig,
    TransferManifest,
)

sys.path.insert(0, str(ROOT / "tests"))
from transfer_helpers import make_pki

FP = LayoutFingerprint({"bench": "tls", "block_size": 16, "tp_rank": 0, "tp_size": 1})


def configs(mode: str, pki: dict, conns: int) -> tuple[ReceiverConfig, SenderConfig]:
    """``pki`` as tests/transfer_helpers.make_pki writes it: (cert, key) paths by stem."""
    if mode == "plain":
        return ReceiverConfig(), SenderConfig(connections=conns)
    server = TlsConfig(
        cert_file=pki["server"][0],
        key_file=pki["server"][1],
        ca_file=pki["ca.paths"][0] if mode == "mtls" else None,
        require_client_cert=mode == "mtls",
    )
    client = TlsConfig(
        ca_file=pki["ca.paths"][0],
        server_name="localhost",
        cert_file=pki["client"][0] if mode == "mtls" else None,
        key_file=pki["client"][1] if mode == "mtls" else None,
    )
    return ReceiverConfig(tls=server), SenderConfig(connections=conns, tls=client)


class _Sink:
    def __init__(self, sizes: list[int]) -> None:
        self.bufs = [np.zeros(n, dtype=np.uint8) for n in sizes]

    def buffer_for(self, item: ItemSpec) -> memoryview:
        return memoryview(self.bufs[int(item.name[1:])])

    def item_done(self, item: ItemSpec) -> None:
        pass


class Pair:
    def __init__(self, mode: str, pki: dict[str, str], conns: int, sizes: list[int]) -> None:
        rc, sc = configs(mode, pki, conns)
        self.rx, self.tx = GrpcTcpReceiver(rc), GrpcTcpSender(sc)
        self.sink = _Sink(sizes)
        self.items = tuple(ItemSpec(f"L{i}", n, i) for i, n in enumerate(sizes))
        rng = np.random.default_rng(0)
        self.src = [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
        self.n = 0

    def round(self) -> float:
        rid, tok = f"r{self.n}", secrets.token_urlsafe(24)
        self.n += 1
        t0 = time.perf_counter()
        rh = self.rx.expect(rid, tok, FP, self.sink, deadline_s=300)
        sh = self.tx.open(self.rx.endpoint, TransferManifest(rid, self.items, FP), tok, deadline_s=300)
        for it, data in zip(self.items, self.src):
            sh.send(it.name, data)
        sh.done.result(timeout=300)
        rh.done.result(timeout=300)
        return sum(len(s) for s in self.src) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=128, help="bytes per transfer (MiB), in 8 items")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    pki = make_pki(Path(tempfile.mkdtemp(prefix="prfaas-tls-bench-")))
    sizes = [(args.mib << 20) // 8] * 8
    pairs = {m: Pair(m, pki, args.connections, sizes) for m in ("plain", "tls", "mtls")}
    try:
        for p in pairs.values():
            p.round()  # warm-up: handshakes, connections, page faults
        runs: dict[str, list[float]] = {m: [] for m in pairs}
        for _ in range(args.rounds):
            for m, p in pairs.items():
                runs[m].append(p.round())
    finally:
        for p in pairs.values():
            p.close()
    med = {m: statistics.median(v) * 8 / 1e9 for m, v in runs.items()}
    rows = ["| channel | goodput Gbit/s (median) | runs | vs plaintext |", "|---|---|---|---|"]
    for m, label in (("plain", "plaintext TCP"), ("tls", "TLS (server certificate)"), ("mtls", "mutual TLS")):
        rows.append(
            f"| {label} | {med[m]:.2f} | {', '.join(f'{r * 8 / 1e9:.2f}' for r in runs[m])} | "
            f"{med[m] / med['plain']:.2f} |"
        )
    body = "\n".join(rows)
    print(body)
    if not args.no_append:
        append_benchmarks(
            "Transfer engine: TLS against plaintext (issue 8)",
            body,
            notes=f"loopback, sender and receiver in one process, {args.connections} connections, "
            f"{args.mib} MiB per transfer, {args.rounds} alternating rounds after a warm-up, "
            "CRC-32C per chunk in all three",
        )


if __name__ == "__main__":
    main()
