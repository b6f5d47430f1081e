"""Chunked-prefill streaming on the emulated link: the tail (end of prefill -> last byte landed at
the decode side) against the whole transfer time, for 8K and 32K prompts, before and after.

  python bench/stream_chunked.py                     # 8K and 32K, 2 Gbit/s, 20 ms RTT (needs root + netns)
  python bench/stream_chunked.py --tokens 8192 --rounds 1 --no-append

Engine-agnostic: the real transfer engine (sender here, receiver in a child behind the tun delay
line of ``prfaas_plugin.netemu``) driven by the vLLM connector's send schedule, not by vLLM (CPU
vLLM cannot prefill 32K tokens of an 80B model). The KV is one prefill rank of Qwen3-Next-80B-A3B
(examples/configs, sized by ``prfaas_plugin.kvsize``): 12 full-attention layers at 2 KiB/token and
36 Gated DeltaNet states. The prefill runs ``--chunk`` tokens per step at ``--prefill-tok-s``; each
step's 48 layers finish evenly over the step, and a full-attention layer's bytes are handed to the
engine when that layer is written (``save_kv_layer``), the states when the step ends
(``wait_for_save``):

* before: every layer's whole prompt goes in the last step (what the connector did: it waited for
  the step that completes the prefill);
* after: each step sends the blocks its chunk finished (``Transfer.ready_tokens`` /
  ``slice_tokens``); the last step its own chunk plus the states.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import transfer as tb  # noqa: E402  (bench/transfer.py: the engine run with its receiver child)
from _common import append_benchmarks  # noqa: E402

from prfaas_plugin.kvsize.layers import LayerKind  # noqa: E402
from prfaas_plugin.kvsize.model import ModelKV  # noqa: E402
from prfaas_plugin.netemu.link import EmulatedLink, LinkSpec, netns_unavailable_reason  # noqa: E402
from prfaas_plugin.transfer import SenderConfig  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "qwen3-next-80b-a3b.json"


def schedule(model: ModelKV, tokens: int, chunk: int, stream: bool) -> list[tuple[int, float, int]]:
    """(step, fraction of the step at which it is handed over, bytes) per item, in send order."""
    steps = -(-tokens // chunk)
    n = len(model.layers)
    out = []
    for s in range(steps):
        lo, hi = s * chunk, min(tokens, (s + 1) * chunk)
        last = s == steps - 1
        for layer in model.layers:
            when = (layer.index + 1) / n
            if layer.kind in (LayerKind.FULL, LayerKind.MLA):
                if stream:
                    out.append((s, when, layer.token_bytes * (hi - lo)))
                elif last:
                    out.append((s, when, layer.token_bytes * tokens))
        if last:
            out += [(s, 1.0, layer.bytes_for(tokens)) for layer in model.layers if layer.kind is LayerKind.LINEAR]
    return out


def run_case(link: EmulatedLink, model: ModelKV, tokens: int, a: argparse.Namespace, stream: bool) -> dict[str, Any]:
    plan = schedule(model, tokens, a.chunk, stream)
    sizes = [b for _, _, b in plan]
    # one more round than measured: the first pays for connecting and TCP slow start
    run = tb.EngineRun(link.addr_a, sizes, a.rounds + 1, SenderConfig(connections=a.connections), netns=link.ns_a)
    step_s = a.chunk / a.prefill_tok_s
    rows = []
    try:
        for _ in range(a.rounds + 1):
            m = tb.TransferManifest(f"b{run.r}", run.items, tb.FP)
            t0 = time.monotonic()
            h = run.tx.open(run.endpoint, m, f"{run.secret}-{run.r}", deadline_s=600)
            run.r += 1
            first_send = None
            for i, (step, frac, _) in enumerate(plan):
                at = t0 + (step + frac) * step_s
                if (d := at - time.monotonic()) > 0:
                    time.sleep(d)
                if first_send is None:
                    first_send = time.monotonic()
                h.send(f"L{i}", run.srcs[i])
            steps = -(-tokens // a.chunk)
            end = t0 + steps * step_s  # the prefill's last step is over
            if (d := end - time.monotonic()) > 0:
                time.sleep(d)
            h.done.result(timeout=600)
            run.timings.append({"t0": t0})
            rows.append({"t0": t0, "first": first_send, "end": end})
    finally:
        run.finish()
    tails, wholes = [], []
    done = _receiver_done(run, len(rows))
    for r, d in list(zip(rows, done))[1:]:
        tails.append(d - r["end"])
        wholes.append(d - r["first"])
    return {
        "tokens": tokens,
        "mode": "stream chunks" if stream else "last step",
        "bytes": sum(sizes),
        "items": len(sizes),
        "prefill_s": -(-tokens // a.chunk) * step_s,
        "tail_s": statistics.median(tails),
        "whole_s": statistics.median(wholes),
        "tails": tails,
    }


def _receiver_done(run: Any, n: int) -> list[float]:
    out = [t.get("t_receiver_done", float("nan")) for t in run.timings]
    if len(out) != n or any(x != x for x in out):
        raise RuntimeError("the receiver did not report every round")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--chunk", type=int, default=2048, help="--max-num-batched-tokens of the prefill")
    ap.add_argument("--prefill-tok-s", type=float, default=8000.0, help="prefill throughput of the emulated rank")
    ap.add_argument("--rate-gbit", type=float, default=2.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args()
    reason = netns_unavailable_reason()
    if reason:
        sys.exit(f"bench/stream_chunked.py: {reason}")
    model = ModelKV.from_file(CONFIG)
    spec = LinkSpec(a.rate_gbit, a.rtt_ms, tcp_buffer_max_bytes=64 << 20)
    results = []
    with EmulatedLink(spec, b_in_root=True) as link:
        for tokens in (int(x) for x in a.tokens.split(",")):
            for stream in (False, True):
                r = run_case(link, model, tokens, a, stream)
                tb.log(
                    f"{tokens} {r['mode']}: prefill {r['prefill_s']:.2f} s, tail {r['tail_s']:.3f} s, "
                    f"whole {r['whole_s']:.3f} s ({[round(x, 3) for x in r['tails']]})"
                )
                results.append(r)
    lines = [
        f"Emulated link {a.rate_gbit:g} Gbit/s, {a.rtt_ms:g} ms RTT (tun delay line, tbf, 64 MiB TCP buffers), "
        f"{a.connections} connections; one Qwen3-Next-80B-A3B prefill rank (TP 1: 12 full-attention layers, "
        f"36 GDN states), {a.chunk}-token chunks at {a.prefill_tok_s:g} tokens/s (emulated compute); median "
        f"of {a.rounds} rounds after a warm-up round. Tail = end of prefill -> last byte landed at the receiver; whole = first byte "
        f"handed to the engine -> last byte landed.",
        "",
        "| prompt | send schedule | MiB | items | prefill s | tail s | whole transfer s | tail / whole |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['tokens']} | {r['mode']} | {r['bytes'] / 2**20:.0f} | {r['items']} | {r['prefill_s']:.2f} | "
            f"{r['tail_s']:.3f} | {r['whole_s']:.3f} | {r['tail_s'] / r['whole_s']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if not a.no_append:
        append_benchmarks(
            "Chunked-prefill streaming: tail vs whole transfer (bench/stream_chunked.py)",
            text,
            notes=f"load average {os.getloadavg()[0]:.1f} at start (other jobs share the 2 CPUs)",
        )


if __name__ == "__main__":
    main()
