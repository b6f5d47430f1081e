"""The demo's calibration phase: the whole request path, timed per route, for the simulator.

The prefill profile (run.py ``_prefill_profile``) times each engine alone, without the router,
the link's handshake or the decode's first step. At the demo's scale (prefills of tens of ms on a
CPU) those fixed costs are most of a request's TTFT, so ``prfaas simulate`` needs them measured,
not guessed (bench/sim_validate.py, docs/simulator.md). Here a second router, with the same
instances but a fixed threshold, carries lone requests (one at a time, so nothing queues) of
the profile's lengths along each route, streaming with the workload's output length:

- ``local.ttft_s``: router -> local engine (prefill + first token) -> client;
- ``prfaas.ttft_s``: router -> producer prefill -> KV over the link -> decode's first token;
- ``prfaas.producer_s``: the producer's own round trip in that path (the router's record), the
  time the PrfaaS engine is held;
- ``tpot_s``: the decode step, from the same streams ((total - TTFT) / (output tokens - 1)).

Each figure is the median of ``reps`` fresh prompts (no prefix is cached), so a calibration
describes typical, not best, conditions on the shared machine.

The calibration router is a separate process, stopped before the demo's own router starts: the
demo's threshold controller, prefix index and egress meter never see these requests.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

ROUTES = ("local", "prfaas")


def _stream(c: httpx.Client, url: str, model: str, prompt: str, out_tokens: int, rid: str) -> tuple[float, float]:
    """(TTFT, total) seconds of one streamed completion, as the demo's client measures them."""
    t0 = time.monotonic()
    ttft = None
    with c.stream(
        "POST",
        f"{url}/v1/completions",
        headers={"x-request-id": rid},
        json={"model": model, "prompt": prompt, "max_tokens": out_tokens, "temperature": 0, "stream": True},
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and ttft is None:
                ttft = time.monotonic() - t0
    total = time.monotonic() - t0
    return (ttft if ttft is not None else total), total


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


def calibrate(
    sup,
    router_cfg: dict,
    out: Path,
    env: dict[str, str],
    lengths: list[int],
    out_tokens: int,
    count_tokens: Callable[[str], int],
    port: int = 8099,
    reps: int = 5,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the calibration phase with ``sup`` (the demo's Supervisor); returns ``summarise``'s dict."""
    from prfaas_plugin.demo.workload import grow_to

    cfg = {**router_cfg, "threshold": {"mode": "fixed", "tokens": 0}}
    path = out / "calibration-router.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "prfaas_plugin", "router", "--config", str(path)]
    sup.start("calibration-router", [*argv, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env)
    try:
        sup.wait_healthy("calibration-router", f"{url}/health", 120)
        samples: dict[str, dict[int, list[dict]]] = {r: {} for r in ROUTES}
        with httpx.Client(timeout=300) as c:
            for route in ROUTES:
                # t = 0 sends every prompt to PrfaaS; t at the router's ceiling keeps every one local
                top = 0 if route == "prfaas" else 1 << 20
                c.put(f"{url}/admin/threshold", json={"threshold_tokens": top}).raise_for_status()
                _stream(c, url, router_cfg["model"], f"warm up {route}", out_tokens, f"cal-warm-{route}")
                for i, n in enumerate(lengths):
                    for rep in range(reps):
                        tag = 7000 + 100 * ROUTES.index(route) + 10 * i + rep
                        prompt = grow_to("", n, count_tokens, random.Random(tag), tag=tag)
                        rid = f"cal-{route}-{n}-{rep}"
                        ttft, total = _stream(c, url, router_cfg["model"], prompt, out_tokens, rid)
                        samples[route].setdefault(n, []).append({"rid": rid, "ttft_s": ttft, "total_s": total})
            recs = {r["request_id"]: r for r in c.get(f"{url}/admin/requests?limit=10000").json()["requests"]}
        for got in samples["prfaas"].values():
            for s in got:
                rec = recs.get(s["rid"], {})
                if rec.get("route") != "prfaas" or rec.get("fallback") or rec.get("prefill_s") is None:
                    raise RuntimeError(f"calibration request {s['rid']} did not take the PrfaaS path: {rec}")
                s["producer_s"] = rec["prefill_s"]
        for got in samples["local"].values():
            for s in got:
                if recs.get(s["rid"], {}).get("route") != "local":
                    raise RuntimeError(f"calibration request {s['rid']} did not stay local")
    finally:
        sup.stop("calibration-router")
    cal = summarise(samples, lengths, out_tokens, reps)
    cal["samples"] = {r: {str(n): v for n, v in samples[r].items()} for r in ROUTES}
    (out / "calibration.json").write_text(json.dumps(cal, indent=2))
    log(
        "calibration (median of lone requests): local TTFT "
        + ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in zip(lengths, cal["local"]["ttft_s"]))
        + "; PrfaaS TTFT "
        + ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in zip(lengths, cal["prfaas"]["ttft_s"]))
        + f"; decode step {cal['tpot_s'] * 1e3:.1f} ms"
    )
    return cal
