"""In-engine offload decisions (engines/vllm/offload.py, scheduler.py): what they cost a local
request, and how far the router's estimate of the uncached length is from the engine's exact one.

``decision``: every hook vLLM's scheduler calls on the connector for one request that prefills
locally (``may_load_async``, ``get_num_new_matched_tokens``, ``update_state_after_alloc``,
``request_finished``; ``build_connector_meta`` once per step), timed per request on vLLM's own
``Request`` objects, side by side with the ``offload`` option off and on (its background thread
running). This is everything the decision adds to a local request's time to first token: the
network work of an offload runs on the background thread, never in these hooks.

``accuracy``: one instance's prefix cache is vLLM's own scheduler-side ``KVCacheManager`` (real
hashing, allocation, LRU eviction, KV events) on a workload of shared system prompts with unique
tails, sized so that it evicts. For each request the engine's exact cached length (what the
connector is handed) is compared with the router's estimate from its prefix index
(router/prefix_index.py) fed either by the same KV events through the router's own decoder
(router/events.py), applied ``lag`` requests late as a subscriber behind concurrent traffic
would, or by the router's own routing record alone (no events: it never learns of evictions).

    python bench/inengine.py decision [--requests N]
    python bench/inengine.py accuracy [--requests N] [--blocks B]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

import torch
from _common import append_benchmarks


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- decision cost ---------------------------------------------------------------------------------
def _side(offload: bool) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from prfaas_plugin.engines.vllm.options import Options
    from prfaas_plugin.engines.vllm.scheduler import SchedulerSide

    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    kv = SimpleNamespace(num_blocks=4096, kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["l0"])])
    cfg = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=16),
        kv_transfer_config=SimpleNamespace(is_kv_consumer=True, is_kv_producer=False),
    )
    extra: dict[str, Any] = {}
    if offload:
        # an unroutable router and instance: the background thread keeps polling, as in service
        extra["offload"] = {
            "prefill_urls": ["http://127.0.0.1:9"],
            "kv_endpoint": "127.0.0.1:15600",
            "threshold_tokens": 8192,
            "threshold_url": "http://127.0.0.1:9",
            "threshold_refresh_s": 0.5,
            "load_scrape_s": 0.5,
        }
    return SchedulerSide(cfg, kv, Options.from_extra(extra))


def bench_decision(n: int, gap_s: float) -> str:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    rng = random.Random(0)
    lengths = [rng.randint(64, 8000) for _ in range(n)]
    rows = []
    per: dict[str, list[float]] = {}
    blocks = SimpleNamespace(get_block_ids=lambda: ([],))
    so = SimpleNamespace(num_scheduled_tokens={}, scheduled_new_reqs=[], scheduled_cached_reqs=None)
    for label, on in (("offload off", False), ("offload on", True)):
        side = _side(on)
        reqs = [
            Request(f"{label}-{i}", list(range(L)), SamplingParams(max_tokens=16), None) for i, L in enumerate(lengths)
        ]
        times: list[float] = []
        clock = time.perf_counter_ns
        for r in reqs:
            computed = (rng.randint(0, r.num_prompt_tokens - 1) // 16) * 16
            t0 = clock()
            side.may_load_async(r)
            got = side.get_num_new_matched_tokens(r, computed)
            side.update_state_after_alloc(r, blocks, got[0])
            side.build_connector_meta(so)
            side.request_finished(r, ([],))
            times.append((clock() - t0) / 1e3)
            assert got == (0, False)
            time.sleep(gap_s)  # requests arrive over time: the background thread's polls fall among them
        side.shutdown()
        per[label] = times
        rows.append((label, statistics.median(times), _pct(times, 0.99), _pct(times, 0.999), max(times)))
    added_p99 = _pct(per["offload on"], 0.99) - _pct(per["offload off"], 0.99)
    out = [
        f"{n:,} local requests, one every {gap_s * 1e3:g} ms (prompts 64-8000 tokens, random whole-block prefix "
        "hits, t = 8192): time in the connector's scheduler hooks per request, in microseconds",
        "",
        "| connector | p50 us | p99 us | p99.9 us | max us |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {lab} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.1f} |" for lab, a, b, c, d in rows]
    out += ["", f"Added by the in-engine decision at p99: {added_p99:.2f} us (goal: under 1 ms)."]
    return "\n".join(out)


# -- router estimate accuracy -------------------------------------------------------------------------
def bench_accuracy(n: int, num_blocks: int, lags: tuple[int, ...], t: int, concurrency: int) -> str:
    import msgspec
    from vllm import SamplingParams
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    from prfaas_plugin.fleet.prefix_index import PrefixIndex
    from prfaas_plugin.router.events import apply_payload

    bs = 16
    init_none_hash(sha256)
    hasher = get_request_block_hasher(bs, sha256)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=1, head_size=8, dtype=torch.float16)
    kcc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    mgr = KVCacheManager(kcc, 32768, bs, bs, enable_caching=True, enable_kv_cache_events=True)
    rng = random.Random(1)
    # shared system prompts (Zipf-popular), each request a unique tail; some multi-turn
    # conversations that come back with their earlier turns as the prefix
    systems = [[rng.randrange(30000) for _ in range(rng.randint(512, 4096))] for _ in range(24)]
    weights = [1 / (k + 1) for k in range(len(systems))]
    convs: list[list[int]] = []
    inst = "http://local-0"
    indexes = {lag: PrefixIndex(bs) for lag in lags}
    pending: dict[int, deque[bytes]] = {lag: deque() for lag in lags}
    own = PrefixIndex(bs)
    errs: dict[str, list[int]] = {f"events, lag {lag}": [] for lag in lags}
    errs["own record, no events"] = []
    flips: dict[str, int] = dict.fromkeys(errs, 0)
    over_offload: dict[str, int] = dict.fromkeys(errs, 0)
    resident: deque[Any] = deque()
    exact_uncached: list[int] = []
    removed = 0
    for i in range(n):
        if convs and rng.random() < 0.3:
            k = rng.randrange(len(convs))
            tokens = convs[k] + [rng.randrange(30000) for _ in range(rng.randint(32, 512))]
            convs[k] = tokens
        else:
            sys_p = rng.choices(systems, weights)[0]
            tokens = sys_p + [rng.randrange(30000) for _ in range(rng.randint(64, 3000))]
            if rng.random() < 0.2:
                convs.append(tokens)
                if len(convs) > 64:
                    convs.pop(0)
        req = Request(f"r{i}", tokens, SamplingParams(max_tokens=1), None, block_hasher=hasher)
        new_blocks, computed, _ = mgr.get_computed_blocks(req)  # what the scheduler hands the connector
        exact = len(tokens) - computed
        exact_uncached.append(exact)
        estimates = {f"events, lag {lag}": indexes[lag].longest_prefix(tokens, [inst])[0] for lag in lags}
        estimates["own record, no events"] = own.longest_prefix(tokens, [inst])[0]
        for name, held in estimates.items():
            est = len(tokens) - held
            errs[name].append(est - exact)
            if (est > t) != (exact > t):
                flips[name] += 1
                over_offload[name] += est > t
        # the engine serves it: blocks for the uncached part, cached as computed; then, with a
        # few requests resident at once, the oldest finishes and its blocks become evictable
        slots = mgr.allocate_slots(req, len(tokens) - computed, computed, new_blocks)
        if slots is None:
            while resident and slots is None:
                mgr.free(resident.popleft())
                slots = mgr.allocate_slots(req, len(tokens) - computed, computed, new_blocks)
        assert slots is not None, "cache too small for one request"
        req.num_computed_tokens = len(tokens)
        resident.append(req)
        while len(resident) > concurrency:
            mgr.free(resident.popleft())
        own.record(inst, tokens)
        events = mgr.take_events()
        removed += sum(len(e.block_hashes) for e in events if type(e).__name__ == "BlockRemoved")
        payload = msgspec.msgpack.encode(KVEventBatch(ts=time.time(), events=events))
        for lag in lags:
            pending[lag].append(payload)
            while len(pending[lag]) > lag:
                apply_payload(indexes[lag], inst, pending[lag].popleft())
    out = [
        f"{n:,} requests on one instance: 24 Zipf-popular system prompts of 512-4096 tokens with unique tails, "
        f"30% multi-turn returns; vLLM's KVCacheManager with {num_blocks:,} blocks of {bs} tokens "
        f"({num_blocks * bs:,} tokens), {concurrency} requests resident; {removed:,} blocks evicted. "
        f"Exact uncached length: median {statistics.median(exact_uncached):,.0f} tokens. "
        f"Decisions compared at t = {t:,}. Lag: KV events applied that many requests late (a subscriber "
        "behind concurrent traffic). Estimate < exact: the router counts blocks the engine no longer holds "
        "(it would keep the request local wrongly); > exact: it missed blocks the engine holds.",
        "",
        "| router estimate | exact | mean abs error (tokens) | p99 abs error | estimate < exact | "
        "estimate > exact | decisions that differ | of which over-offload |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in errs.items():
        a = [abs(x) for x in e]
        out.append(
            f"| {name} | {sum(1 for x in e if x == 0) / n:.1%} | {statistics.mean(a):.1f} | {_pct(a, 0.99):,.0f} | "
            f"{sum(1 for x in e if x < 0) / n:.1%} | {sum(1 for x in e if x > 0) / n:.1%} | "
            f"{flips[name] / n:.2%} | {over_offload[name]} of {flips[name]} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decision")
    d.add_argument("--requests", type=int, default=20000)
    d.add_argument("--gap-ms", type=float, default=0.5, help="pause between requests (outside the timing)")
    a = sub.add_parser("accuracy")
    a.add_argument("--requests", type=int, default=4000)
    a.add_argument("--blocks", type=int, default=4096)
    a.add_argument("--threshold", type=int, default=2048)
    a.add_argument("--concurrency", type=int, default=8)
    a.add_argument("--no-append", action="store_true")
    d.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.what == "decision":
        body = bench_decision(args.requests, args.gap_ms / 1e3)
        title = "In-engine offload decision: time added to a local request (vLLM connector)"
        notes = (
            "bench/inengine.py decision: the connector's scheduler hooks per request, offload off vs on "
            "(background thread polling an unreachable router and instance meanwhile)"
        )
    else:
        body = bench_accuracy(args.requests, args.blocks, (0, 8), args.threshold, args.concurrency)
        title = "Router's estimated uncached length vs the engine's exact one (shared prefixes, evictions)"
        notes = (
            "bench/inengine.py accuracy: vLLM's own KVCacheManager as the instance's cache; the router's "
            "PrefixIndex fed by its KV events (router/events.py decoder) or by its own routing record"
        )
    print(body)
    if not args.no_append:
        append_benchmarks(title, body, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
