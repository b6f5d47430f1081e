"""Reliability report (issue 8): faults injected on the KV path, requests that survived, requests
that failed cleanly, and leaks (must be 0). Prints the table and appends it to BENCHMARKS.md.

    python bench/reliability.py [--requests 8] [--mib 4] [--no-append]
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time
from pathlib import Path

from _common import append_benchmarks

from prfaas_plugin.faults.matrix import FINGERPRINT, default_cases, run_case, until

PEER = Path(__file__).resolve().parent / "_transfer_peer.py"


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(PEER), *args], stdout=subprocess.PIPE, text=True)


def _until(pred, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    return until(pred, timeout_s, interval_s=0.01)


def process_killed(role: str, requests: int, nbytes: int, deadline_s: float = 30.0) -> str:
    """The other side of ``requests`` concurrent sessions runs in its own process and is
    SIGKILLed once bytes flow. Every session on the surviving side must fail with a typed
    error well inside its deadline, leave no session/request behind, and a fresh peer process
    must then get a transfer through the same surviving engine."""
    import numpy as np
    from _transfer_peer import Sink

    from prfaas_plugin.transfer import (
        GrpcTcpReceiver,
        GrpcTcpSender,
        ItemSpec,
        SenderConfig,
        TransferError,
        TransferManifest,
    )

    tok = secrets.token_urlsafe(24)
    rids = [f"kill-{role}-{i}-{secrets.token_hex(3)}" for i in range(requests)]
    errors: dict[str, int] = {}
    failed = hung = 0
    slowest = 0.0
    leaks: list[str] = []
    item = (ItemSpec("big", nbytes),)

    if role == "receiver":  # we send; the receiving process dies
        engine = GrpcTcpSender(SenderConfig(chunk_bytes=64 << 10, connections=2, pacing_gbps=0.1))
        proc = _spawn("receiver", tok, *rids)
        endpoint = proc.stdout.readline().strip()  # type: ignore[union-attr]
        data = np.ones(nbytes, dtype=np.uint8)
        handles = []
        for rid in rids:
            h = engine.open(endpoint, TransferManifest(rid, item, FINGERPRINT), tok, deadline_s=deadline_s)
            h.send("big", data)
            handles.append(h)
        flowing = _until(lambda: sum(h.progress()["bytes_sent"] for h in handles) > (1 << 20))
        futures = [h.done for h in handles]
    else:  # we receive; the sending process dies
        engine = GrpcTcpReceiver()
        handles = [engine.expect(rid, tok, FINGERPRINT, Sink(), deadline_s=deadline_s) for rid in rids]
        proc = _spawn("sender", engine.endpoint, tok, str(nbytes), *rids)
        flowing = _until(lambda: sum(h.progress()["bytes_received"] for h in handles) > (1 << 20))
        futures = [h.done for h in handles]
    t0 = time.monotonic()
    proc.kill()
    proc.wait()
    for f in futures:
        try:
            f.result(timeout=deadline_s + 5)
        except TransferError as e:
            failed += 1
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        except Exception:
            hung += 1
        slowest = max(slowest, time.monotonic() - t0)
    active = (
        (lambda: engine.stats()["requests_active"])
        if role == "receiver"
        else (lambda: engine.stats()["sessions_active"])
    )
    if not _until(lambda: active() == 0, 5.0):
        leaks.append(f"{active()} left on the surviving side")
    # Recovery: a fresh peer process, the same surviving engine.
    rid = f"after-{role}-{secrets.token_hex(3)}"
    if role == "receiver":
        proc = _spawn("receiver", tok, rid)
        endpoint = proc.stdout.readline().strip()  # type: ignore[union-attr]
        small = np.ones(1 << 20, dtype=np.uint8)
        h = engine.open(endpoint, TransferManifest(rid, (ItemSpec("big", 1 << 20),), FINGERPRINT), tok, deadline_s=30)
        h.send("big", small)
        recovered = h.done.exception(timeout=40) is None
    else:
        h = engine.expect(rid, tok, FINGERPRINT, Sink(), deadline_s=60)
        proc = _spawn("sender", engine.endpoint, tok, str(1 << 20), rid)
        recovered = h.done.exception(timeout=70) is None
    proc.kill()
    proc.wait()
    engine.close()
    errs = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "-"
    name = f"{role} process killed (SIGKILL)"
    done_before = requests - failed - hung  # finished before the kill (the oldest go first)
    return (
        f"| transfer engine | {name} | {requests} | {done_before} | {failed} | {hung} | {len(leaks)} | "
        f"{'yes' if recovered and flowing else 'NO'} | {slowest:.2f} after the kill / {deadline_s:.0f} | {errs} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--mib", type=int, default=4, help="bytes per request, MiB")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    nbytes = args.mib << 20
    rows = []
    for case in default_cases(nbytes):
        r = run_case(case, requests=args.requests, request_bytes=nbytes)
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.error_types.items())) or "-"
        rows.append(
            f"| transfer engine | {r.case} | {r.injected} | {r.survived} | {r.failed_cleanly} | "
            f"{r.wrong_data + r.hung + len(r.untyped_errors)} | {len(r.leaks)} | "
            f"{'yes' if r.recovered else 'NO'} | {r.max_resolve_s:.2f} / {case.deadline_s:.0f} | {errs} |"
        )
    for role in ("receiver", "sender"):
        rows.append(process_killed(role, args.requests, nbytes))
    table = "\n".join(
        [
            "| path | fault | requests | survived (exact) | failed cleanly | wrong/hung/untyped | leaks | recovered | slowest resolve s / deadline | typed errors (both sides) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not args.no_append:
        append_benchmarks(
            "Reliability: faults on the KV path (issue 8)",
            table,
            notes=f"{args.requests} concurrent requests of {args.mib} MiB per fault, fault proxy on the data plane",
        )


if __name__ == "__main__":
    main()
