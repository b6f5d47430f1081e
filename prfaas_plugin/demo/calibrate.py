"""The demo's calibration phase: the whole request path, timed per route, for the simulator.

The prefill profile (run.py ``_prefill_profile``) times each engine alone, without the router,
the link's handshake or the decode's first step. At the demo's scale (prefills of tens of ms on a
CPU) those fixed costs are most of a request's TTFT, so ``prfaas simulate`` needs them measured,
not guessed (bench/sim_validate.py, docs/simulator.md). Here two more routers, with the same
instances and a fixed threshold each (0: every request to PrfaaS; the ceiling: every request
local), carry requests of the profile's lengths along each route, streaming with the
workload's output length, first lone (one at a time, nothing queues), then in the two states the
workload's two clients put the engines in: busy (both routes at once, one request at a time
each) and pairs (two requests of one route at once: for PrfaaS two prefills on the producer and
two transfers into the decode instance, locally two prefills batched on one engine; either takes
up to two or three times a lone request's TTFT on the demo's stack):

- ``local.ttft_s``: router -> local engine (prefill + first token) -> client;
- ``prfaas.ttft_s``: router -> producer prefill -> KV over the link -> decode's first token;
- ``prfaas.producer_s``: the producer's own round trip in that path (the router's record), the
  time the PrfaaS engine is held;
- ``tpot_s``: the decode step, from the same streams ((total - TTFT) / (output tokens - 1)).

Each figure is the median of ``reps`` lone fresh prompts (no prefix is cached), so a calibration
describes typical, not best, conditions on the shared machine; the raw samples, lone, busy and
pair, are kept (the simulator draws from their spread by how many requests, of which route, are
open when a request arrives).

The calibration routers are separate processes, stopped before the demo's own router starts: the
demo's threshold controller, prefix index and egress meter never see these requests.
"""

from __future__ import annotations

import functools
import json
import random
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from prfaas_plugin.demo.client import stream_completion

ROUTES = ("local", "prfaas")


def _stream(c: httpx.Client, url: str, model: str, prompt: str, out_tokens: int, rid: str) -> tuple[float, float]:
    """(TTFT, total) seconds of one streamed completion, as the demo's client measures them."""
    a = stream_completion(c, url, model, prompt, out_tokens, rid)
    return a.ttft_s, a.total_s


def summarise(samples: dict[str, dict[int, list[dict]]], lengths: list[int], out_tokens: int, reps: int) -> dict:
    """Medians per route and length from raw samples (``ttft_s``, ``total_s``, ``producer_s``)."""
    if out_tokens < 2:
        raise ValueError("calibration needs at least 2 output tokens to time a decode step")
    cal: dict = {"lengths": list(lengths), "reps": reps, "output_tokens": out_tokens}
    steps = []
    for route in ROUTES:
        per = samples[route]
        missing = [n for n in lengths if not per.get(n)]
        if missing:
            raise ValueError(f"calibration: no {route} samples at lengths {missing}")
        cal[route] = {"ttft_s": [statistics.median(s["ttft_s"] for s in per[n]) for n in lengths]}
        if route == "prfaas":
            cal[route]["producer_s"] = [statistics.median(s["producer_s"] for s in per[n]) for n in lengths]
        steps += [(s["total_s"] - s["ttft_s"]) / (out_tokens - 1) for n in lengths for s in per[n]]
    cal["tpot_s"] = statistics.median(steps)
    return cal


def _prompt(route: str, i: int, rep: int, n: int, count_tokens: Callable[[str], int]) -> str:
    from prfaas_plugin.demo.workload import grow_to

    tag = 7000 + 100 * ROUTES.index(route) + 10 * i + rep
    return grow_to("", n, count_tokens, random.Random(tag), tag=tag)


def calibrate(
    sup,
    router_cfg: dict,
    out: Path,
    env: dict[str, str],
    lengths: list[int],
    out_tokens: int,
    count_tokens: Callable[[str], int],
    port: int = 8098,
    reps: int = 5,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the calibration phase with ``sup`` (the demo's Supervisor); returns ``summarise``'s dict
    with the raw samples, lone (``samples``), busy (``busy_samples``: each route timed while the
    other route is kept busy, as in the workload, where another request is nearly always open) and
    pair (``pair_samples``: each route timed while another request of the same route is open)."""
    model = router_cfg["model"]
    urls = {}
    for k, route in enumerate(ROUTES):
        # t = 0 sends every prompt to PrfaaS; t at the router's ceiling keeps every one local
        cfg = {**router_cfg, "threshold": {"mode": "fixed", "tokens": 0 if route == "prfaas" else 1 << 20}}
        path = out / f"calibration-router-{route}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        urls[route] = f"http://127.0.0.1:{port + k}"
        argv = [sys.executable, "-m", "prfaas_plugin", "router", "--config", str(path), "--host", "127.0.0.1"]
        sup.start(f"calibration-{route}", [*argv, "--port", str(port + k), "--log-level", "warning"], env)
    lone: dict[str, dict[int, list[dict]]] = {r: {} for r in ROUTES}
    busy: dict[str, dict[int, list[dict]]] = {r: {} for r in ROUTES}
    pair: dict[str, dict[int, list[dict]]] = {r: {} for r in ROUTES}
    try:
        for route in ROUTES:
            sup.wait_healthy(f"calibration-{route}", f"{urls[route]}/health", 120)
        with httpx.Client(timeout=300) as c:
            for route in ROUTES:
                # untimed warm-up at each length, then the lengths interleaved pass by pass: a
                # route's first requests after the other route ran are slow, and timed in one
                # block they would inflate one length's median and skew every ratio drawn against it
                for i, n in enumerate(lengths):
                    warm = f"warm {_prompt(route, i, reps + 1, n, count_tokens)}"
                    _stream(c, urls[route], model, warm, out_tokens, f"cal-warm-{route}-{n}")
                for rep in range(reps):
                    for i, n in enumerate(lengths):
                        rid = f"cal-{route}-{n}-{rep}"
                        prompt = _prompt(route, i, rep, n, count_tokens)
                        ttft, total = _stream(c, urls[route], model, prompt, out_tokens, rid)
                        lone[route].setdefault(n, []).append({"rid": rid, "ttft_s": ttft, "total_s": total})
        phase = functools.partial(_concurrent_phase, urls, model, lengths, reps, out_tokens, count_tokens)
        phase("busy", ["prfaas", "local"], busy)
        for route in ROUTES:
            phase("pair", [route, route], pair)
        for route in ROUTES:
            with httpx.Client(timeout=30) as c:
                recs = {
                    r["request_id"]: r for r in c.get(f"{urls[route]}/admin/requests?limit=10000").json()["requests"]
                }
            for got in [*lone[route].values(), *busy[route].values(), *pair[route].values()]:
                for s in got:
                    rec = recs.get(s["rid"], {})
                    if rec.get("route") != route or rec.get("fallback"):
                        raise RuntimeError(f"calibration request {s['rid']} did not take the {route} path: {rec}")
                    if route == "prfaas":
                        if rec.get("prefill_s") is None:
                            raise RuntimeError(f"calibration request {s['rid']}: no producer time recorded")
                        s["producer_s"] = rec["prefill_s"]
    finally:
        for route in ROUTES:
            sup.stop(f"calibration-{route}")
    cal = summarise(lone, lengths, out_tokens, reps)
    cal["samples"] = {r: {str(n): v for n, v in lone[r].items()} for r in ROUTES}
    cal["busy_samples"] = {r: {str(n): v for n, v in busy[r].items()} for r in ROUTES}
    cal["pair_samples"] = {r: {str(n): v for n, v in pair[r].items()} for r in ROUTES}
    (out / "calibration.json").write_text(json.dumps(cal, indent=2))
    log(
        "calibration (median of lone requests): local TTFT "
        + ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in zip(lengths, cal["local"]["ttft_s"]))
        + "; PrfaaS TTFT "
        + ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in zip(lengths, cal["prfaas"]["ttft_s"]))
        + f"; decode step {cal['tpot_s'] * 1e3:.1f} ms"
    )
    return cal


def _concurrent_phase(
    urls: dict[str, str],
    model: str,
    lengths: list[int],
    reps: int,
    out_tokens: int,
    count_tokens: Callable[[str], int],
    name: str,
    loops: list[str],
    into: dict[str, dict[int, list[dict]]],
) -> None:
    """One client per entry of ``loops`` (a route each), all at once, one request at a time each:
    the first runs its ``reps`` passes over the lengths while the others cycle over them (starting
    half-way round) until it is done, so every sample of any of them ran while the others kept
    their route busy. Samples go to ``into`` by route."""
    done = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(j: int, route: str) -> None:
        prompts = {n: _prompt(route, i, reps, n, count_tokens) for i, n in enumerate(lengths)}
        k = 0
        try:
            with httpx.Client(timeout=300) as c:
                while not done.is_set() and (j > 0 or k < reps * len(lengths)):
                    # the clients start at different lengths, so requests of unlike sizes meet (as
                    # in the workload) rather than two of one size batched in lockstep
                    n = lengths[(k + j * len(lengths) // 2) % len(lengths)]
                    rid = f"cal-{name}{j}-{route}-{n}-{k}"
                    # a fresh prompt each time (nothing cached): the phase, client and pass open it
                    ttft, total = _stream(c, urls[route], model, f"{name}{j}-{k} {prompts[n]}", out_tokens, rid)
                    with lock:
                        into[route].setdefault(n, []).append({"rid": rid, "ttft_s": ttft, "total_s": total})
                    k += 1
        except BaseException as exc:  # re-raised below, in the calling thread
            errors.append(exc)
        finally:
            if j == 0 or errors:
                done.set()

    threads = [threading.Thread(target=run, args=(j, r)) for j, r in enumerate(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
