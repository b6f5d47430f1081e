"""The router's added latency, two code revisions side by side in one run.

Two routers -- this checkout's and the one at ``--base`` (a git revision, exported to a
temporary folder) -- run in front of the same instant fake engine, and one open-loop client sends
decoding streams (20 tokens, 50 ms apart) to router A, router B and the engine directly,
interleaved in the same seconds. Host-wide stalls fall on all three samples alike, so the two
routers' added time to first byte (their TTFB minus the direct one) compare fairly even on a
noisy host. Both routers share one core, as do the client and the engine the other.

    python bench/router_ab.py --base REV [--rate 200] [--seconds 10] [--rounds 3] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, append_benchmarks
from router import Errors, _open_loop, _pct, _router_own_ms, _run, _wait, build_bpe_tokenizer

from prfaas_plugin.demo.ports import free_port
from prfaas_plugin.protocol import metrics as M


def _export(rev: str, dest: Path) -> str:
    """``rev``'s tree under ``dest``; returns its short hash."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--base {rev!r}: not a revision of this repository ({sha.stderr.strip()})")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return sha.stdout.strip()


def _router(src: Path, cfg: Path, port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "prfaas_plugin", "router", "--config", str(cfg), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(
        argv,
        env=dict(os.environ, PYTHONPATH=str(src)),
        cwd=str(src),
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="git revision to compare this checkout against")
    ap.add_argument("--rate", type=float, default=200.0, help="new streams per second, all targets together")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    router_cpu = cpus[-1] if len(cpus) > 1 else None
    if router_cpu is not None:
        os.sched_setaffinity(0, set(cpus) - {router_cpu})  # client and engine on the other core(s)

    tmp = Path(tempfile.mkdtemp(prefix="prfaas-router-ab-"))
    base_sha = _export(args.base, tmp / "base")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "prfaas_plugin"], capture_output=True)
    head_name = head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    tok_dir, _words = build_bpe_tokenizer(tmp / "tok")
    e_port, a_port, b_port = free_port(), free_port(), free_port()
    engine = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_fake_openai.py"), str(e_port)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    cfg = {
        "model": "bench",
        "tokenizer": str(tok_dir),
        "block_size": 16,
        "threshold": {"mode": "fixed", "tokens": 4096},
        "clusters": [
            {
                "name": "local",
                "kind": "local",
                "both": [{"url": f"http://127.0.0.1:{e_port}", "kv_endpoint": "127.0.0.1:15600"}],
            }
        ],
    }
    (tmp / "router.yaml").write_text(yaml.safe_dump(cfg))
    procs = [
        engine,
        _router(ROOT, tmp / "router.yaml", a_port, router_cpu),
        _router(tmp / "base", tmp / "router.yaml", b_port, router_cpu),
    ]
    try:
        for port in (e_port, a_port, b_port):
            _wait(f"http://127.0.0.1:{port}/health", timeout=180)  # two routers start on one pinned core
        urls = {
            "direct": f"http://127.0.0.1:{e_port}/v1/completions",
            head_name: f"http://127.0.0.1:{a_port}/v1/completions",
            base_sha: f"http://127.0.0.1:{b_port}/v1/completions",
        }
        n = int(args.rate * args.seconds)

        def arrivals(tag: str, rnd: int = 0) -> list[tuple[str, dict]]:
            # Which router's request follows the direct one alternates between rounds, so neither
            # always arrives first on their shared core.
            a, b = urls[head_name], urls[base_sha]
            targets = [urls["direct"], a, b] if rnd % 2 == 0 else [urls["direct"], b, a]
            return [
                (
                    targets[k % 3],
                    {
                        "model": "bench",
                        "prompt": f"{tag} {k}",
                        "max_tokens": 20,
                        "stream": True,
                        "bench_token_delay_s": 0.05,
                    },
                )
                for k in range(n)
            ]

        _run(_open_loop(arrivals("warm"), args.rate, Errors(), {}, skip=n))  # pools filled, code paths warm
        rows = []
        for rnd in range(args.rounds):
            ttfb: dict[str, list[float]] = {}
            errors = Errors()
            since = time.time() + 1.0
            _run(_open_loop(arrivals(f"round{rnd}", rnd), args.rate, errors, ttfb, skip=int(args.rate)))
            until = time.time()
            direct = [x * 1e3 for x in ttfb.get(urls["direct"], [])]
            row = [str(rnd + 1), f"{_pct(direct, 0.5):.1f} / {_pct(direct, 0.99):.1f}"]
            for name in (head_name, base_sha):
                routed = [x * 1e3 for x in ttfb.get(urls[name], [])]
                port = a_port if name == head_name else b_port
                own = _router_own_ms(f"http://127.0.0.1:{port}", since, until)
                added = (_pct(routed, 0.5) - _pct(direct, 0.5), _pct(routed, 0.99) - _pct(direct, 0.99))
                row.append(f"{added[0]:.1f} / {added[1]:.1f}")
                row.append(f"{_pct(own, 0.5):.2f} / {_pct(own, 0.99):.2f}" if own else "-")
            row.append(str(sum(errors.values())))
            rows.append(row)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    head_cols = (
        f"| round | direct TTFB p50 / p99 ms | {head_name}: added p50 / p99 ms | {head_name}: own time p50 / p99 ms "
        f"| {base_sha}: added p50 / p99 ms | {base_sha}: own time p50 / p99 ms | failed |"
    )
    table = "\n".join([head_cols, "|" + "---|" * 7] + ["| " + " | ".join(r) + " |" for r in rows])
    print(table)
    if not args.no_append:
        append_benchmarks(
            f"Router added latency, {head_name} against {base_sha} side by side",
            table,
            f"{args.rate:.0f} new streams/s (20 tokens 50 ms apart) split evenly over router {head_name}, router "
            f"{base_sha} and the fake engine directly, interleaved in the same seconds; both routers on one core, "
            "client and engine on the other; 'added' = routed TTFB minus direct TTFB at the same percentile; "
            f"'own time' = the router's {M.ROUTER_OVERHEAD.name} per request",
        )


if __name__ == "__main__":
    main()
