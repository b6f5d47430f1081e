"""The simulator against real `prfaas demo` runs (issue 20). Each run is replayed in
`prfaas simulate` from what that run measured and sent, and nothing else:

- planner.yaml: the engines' prefill profiles, the KV size, the link (the router's controller
  re-optimises on this file, so the simulated one does too);
- router.yaml: the threshold loop's settings (parsed by the router's own config class);
- report.json: the requests (client send time; the router's l_total and l_prefix), the demo's
  calibration phase (demo/calibrate.py: the whole path timed per route on lone requests, and the
  decode step) and the router's threshold timeline, which places the router's clock (below).

The router's clock: its threshold loop ticks every 0.5 s and re-optimises every
``reoptimize_every_s`` on its own clock, which started before the workload. The offset is the one
that makes the router's timeline (change times on its clock) agree with the threshold each
answer carried (its decision time on the wall clock, against the workload's start): the middle
of the offsets with the fewest disagreements. The tick and re-optimisation phases are those of
the timeline's own marks.

python bench/sim_validate.py out/demo-v1 out/demo-v2 ... [--no-append]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from _common import append_benchmarks

from prfaas_plugin.router.config import load_router_config
from prfaas_plugin.sim.config import load_simulation
from prfaas_plugin.sim.model import Deployment, simulate_deployment
from prfaas_plugin.sim.workload import make_requests


def router_offset(report: dict) -> tuple[float, int] | None:
    """(router clock at the workload's start, requests whose threshold disagrees there), or None
    when the report lacks the router's decision times or the timeline has no change to place."""
    t0 = report.get("workload_t0_wall")
    timeline = report.get("threshold_timeline") or []
    reqs = [r for r in report["requests"] if (r.get("router") or {}).get("started_at") is not None]
    if t0 is None or len(timeline) < 2 or not reqs:
        return None
    times = np.array([t for t, _ in timeline])
    values = np.array([v for _, v in timeline])
    decided = np.array([r["router"]["started_at"] - t0 for r in reqs])
    seen = np.array([round(r["threshold_tokens"]) for r in reqs])
    # the threshold the timeline shows at router time x (the last change at or before x)
    cands = np.arange(0.0, times[-1] + 1.0, 0.001)
    idx = np.searchsorted(times, decided[None, :] + cands[:, None], side="right") - 1
    shown = np.round(values[np.clip(idx, 0, None)])
    bad = (shown != seen[None, :]).sum(axis=1)
    best = bad.min()
    ok = cands[bad == best]
    # the middle of the first run of equally good offsets
    run_end = np.flatnonzero(np.diff(ok) > 0.0015)
    first = ok[: run_end[0] + 1] if len(run_end) else ok
    return float((first[0] + first[-1]) / 2), int(best)


def router_clock(report: dict) -> dict | None:
    """The simulation's ``router_clock`` for a run (None: it cannot be placed)."""
    off = router_offset(report)
    if off is None:
        return None
    timeline, reasons = report["threshold_timeline"], report.get("threshold_reasons") or []
    marks = [t for (t, _), why in zip(timeline, reasons) if why != "start"] or [t for t, _ in timeline[1:]]
    reopt = [t for (t, _), why in zip(timeline, reasons) if why.startswith("re-optimised")]
    clock = {"at_start_s": off[0], "tick_at_s": marks[0]}
    if reopt:
        clock["reoptimised_at_s"] = reopt[0]
    return clock


def replay(run: Path, measured: bool = True, seeds: int = 50) -> dict:
    report = json.loads((run / "report.json").read_text())
    rcfg = load_router_config(run / "router.yaml")
    th = rcfg.threshold
    reqs = sorted((r for r in report["requests"] if r["error"] is None), key=lambda r: r["started_at_s"])

    def lengths(r: dict) -> tuple[int, int]:
        rr = r.get("router") or {}
        if rr.get("l_prefix") is not None:  # the router's own count of the prompt
            return r["uncached_tokens"] + rr["l_prefix"], rr["l_prefix"]
        return r["prompt_tokens"], max(0, r["prompt_tokens"] - r["uncached_tokens"])

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        rows = []
        for r in reqs:
            total, cached = lengths(r)
            rows.append(json.dumps({"t": r["started_at_s"], "prompt_tokens": total, "cached_tokens": cached}))
        trace.write_text("\n".join(rows))
        cfg_raw = yaml.safe_load((run / "planner.yaml").read_text())
        sim = {
            "duration_s": max(r["started_at_s"] for r in reqs) + 60,
            "warmup_s": 0,
            "arrivals": {"kind": "trace", "trace": str(trace)},
            "block_tokens": rcfg.block_size,
            "link_rtt_ms": report["link"]["rtt_ms"],
            "start_threshold": th.tokens,
            "queue_high": th.queue_high,
            "controller": {
                "reoptimize_every_s": th.reoptimize_every_s,
                "window": th.window,
                "min_samples": th.min_samples,
                "egress_high": th.egress_high,
                "egress_low": th.egress_low,
                "queue_low": th.queue_low,
                "step": th.step,
                "egress_window_s": th.egress_window_s,
                "apply_split": False,
            },
            "bin_s": 1.0,
        }
        cal = report.get("calibration")
        if measured and cal:
            sim["measured_path"] = measured_path(cal)
        clock = router_clock(report)
        if clock is not None:
            sim["router_clock"] = clock
        cfg_raw["simulation"] = sim
        path = Path(tmp) / "planner.yaml"
        path.write_text(yaml.safe_dump(cfg_raw))
        cfg, spec, base = load_simulation(path)
        requests = make_requests(spec, cfg.length_distribution(base), base)
        dep = Deployment("demo", 1, 0, 0, "online" if th.mode == "auto" else "fixed", th.tokens, n_both=1)
        results = [
            simulate_deployment(dep, cfg, spec.model_copy(update={"seed": seed}), requests)
            for seed in range(seeds if sim.get("measured_path", {}).get("local_spread") else 1)
        ]
    meas_route = np.array([r["route"] == "prfaas" for r in reqs])
    out: dict = {
        # per trace row (the trace is in send order, as ``reqs``); the most over the seeds
        "route_mismatch": max(int((res.route != meas_route).sum()) for res in results),
        "offset": router_offset(report),
        "calibrated": bool(measured and cal),
        "seeds": len(results),
    }
    for route in ("prfaas", "local"):
        meas = np.array([r["ttft_s"] for r in reqs if r["route"] == route])
        runs = [res.ttft_by_route[route] for res in results if len(res.ttft_by_route[route])]
        out[route] = {
            "n_meas": len(meas),
            "n_sim": len(results[0].ttft_by_route[route]),
            "meas": (float(np.median(meas)), float(np.percentile(meas, 90))) if len(meas) else None,
            # the simulator's expectation: each statistic averaged over the seeds' draws
            "sim": (
                float(np.mean([np.median(x) for x in runs])),
                float(np.mean([np.percentile(x, 90) for x in runs])),
            )
            if runs
            else None,
        }
    return out


def measured_path(cal: dict) -> dict:
    """The simulation's ``measured_path`` from a demo's calibration: its medians per length, the
    decode step, and the spreads -- each sample over the median at its length (PrfaaS: the pair
    producer time, TTFT)."""
    lengths = cal["lengths"]
    path = {
        "lengths": lengths,
        "local_ttft_s": cal["local"]["ttft_s"],
        "prfaas_producer_s": cal["prfaas"]["producer_s"],
        "prfaas_ttft_s": cal["prfaas"]["ttft_s"],
        "decode_step_s": cal["tpot_s"],
    }
    for key, suffix in (("samples", ""), ("busy_samples", "_busy"), ("pair_samples", "_pair")):
        samples = cal.get(key) or {}
        local, prfaas = [], []
        for i, n in enumerate(lengths):
            for s in samples.get("local", {}).get(str(n), []):
                local.append(s["ttft_s"] / cal["local"]["ttft_s"][i])
            for s in samples.get("prfaas", {}).get(str(n), []):
                prfaas.append(
                    (s["producer_s"] / cal["prfaas"]["producer_s"][i], s["ttft_s"] / cal["prfaas"]["ttft_s"][i])
                )
        path[f"local_spread{suffix}"], path[f"prfaas_spread{suffix}"] = local, prfaas
    return path


def slowdowns(report: dict) -> dict[str, dict[str, float | None]] | None:
    """Per route, TTFT over the lone calibration median at the request's length (the median of
    those ratios): for the calibration's busy and pair phases, and for the workload's requests by
    what else was open when each started (``beside_other``: a request of the other route;
    ``beside_same``: one of its own route). The simulator draws from the phases for those
    conditions, so the two should agree; None without a calibration."""
    cal = report.get("calibration")
    if not cal:
        return None
    lengths = cal["lengths"]

    def ratio(route: str, n: int, ttft: float) -> float:
        return ttft / float(np.interp(n, lengths, cal[route]["ttft_s"]))

    def med(xs: list[float]) -> float | None:
        return float(np.median(xs)) if xs else None

    reqs = [q for q in report["requests"] if q["route"] in ("prfaas", "local")]
    out: dict[str, dict[str, float | None]] = {}
    for route in ("prfaas", "local"):
        row: dict[str, float | None] = {}
        for key, name in (("busy_samples", "busy"), ("pair_samples", "pair")):
            got = (cal.get(key) or {}).get(route, {})
            row[name] = med([ratio(route, int(n), s["ttft_s"]) for n, ss in got.items() for s in ss])
        by: dict[str, list[float]] = {"beside_other": [], "beside_same": []}
        for q in reqs:
            if q["route"] != route:
                continue
            t = q["started_at_s"]
            others = {
                p["route"] for p in reqs if p is not q and p["started_at_s"] <= t < p["started_at_s"] + p["total_s"]
            }
            if others:
                key = "beside_same" if route in others else "beside_other"
                by[key].append(ratio(route, q["uncached_tokens"], q["ttft_s"]))
        row.update({k: med(v) for k, v in by.items()})
        out[route] = row
    return out


def slowdown_table(runs: list[Path]) -> str:
    rows = [
        "| demo run | route | calibration: busy / pair phase | workload: beside the other route / beside its own |",
        "|---|---|---|---|",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for run in runs:
        got = slowdowns(json.loads((run / "report.json").read_text()))
        if got is None:
            continue
        for route, r in got.items():
            rows.append(
                f"| {run.name} | {route} | {f(r['busy'])} / {f(r['pair'])} | {f(r['beside_other'])} / {f(r['beside_same'])} |"
            )
    return (
        "TTFT over the lone calibration median at each request's length (medians), the calibration's "
        "concurrent phases against the workload's requests by what else was open at their start:\n\n" + "\n".join(rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--notes", default="", help="how the demo runs were made (appended to the entry)")
    args = ap.parse_args()
    rows = [
        "| demo run | service times | route | requests measured / simulated (routed differently) "
        "| TTFT median measured / simulated (error) | TTFT P90 measured / simulated (error) |",
        "|---|---|---|---|---|---|",
    ]
    errors = []
    signed: dict[tuple[str, str], list[float]] = {}  # (route, statistic) -> signed errors, calibrated rows
    for run in args.runs:
        for measured in (True, False):
            v = replay(run, measured)
            label = "calibrated path" if v["calibrated"] else "idle profile"
            if not measured and not json.loads((run / "report.json").read_text()).get("calibration"):
                continue  # the same as the row above
            for route in ("prfaas", "local"):
                x = v[route]
                counts = f"{x['n_meas']} / {x['n_sim']} ({v['route_mismatch']})"
                if not x["meas"] or not x["sim"]:
                    rows.append(f"| {run.name} | {label} | {route} | {counts} | - | - |")
                    continue
                (m50, m90), (s50, s90) = x["meas"], x["sim"]
                e50, e90 = (s50 - m50) / m50, (s90 - m90) / m90
                if v["calibrated"]:
                    errors += [abs(e50), abs(e90)]
                    signed.setdefault((route, "median"), []).append(e50)
                    signed.setdefault((route, "P90"), []).append(e90)
                rows.append(
                    f"| {run.name} | {label} | {route} | {counts} | {m50 * 1e3:.0f} / {s50 * 1e3:.0f} ms ({e50:+.0%}) "
                    f"| {m90 * 1e3:.0f} / {s90 * 1e3:.0f} ms ({e90:+.0%}) |"
                )
    table = "\n".join(rows)
    if errors:
        table += (
            f"\n\nCalibrated rows: {sum(e <= 0.2 for e in errors)} of {len(errors)} figures within 20%; "
            f"largest error {max(errors):.0%}, median {float(np.median(errors)):.0%}. Bias (mean signed error) "
            "and range over the runs: "
            + "; ".join(
                f"{route} {stat} {float(np.mean(e)):+.0%} ({min(e):+.0%} to {max(e):+.0%})"
                for (route, stat), e in signed.items()
            )
            + "."
        )
    table += "\n\n" + slowdown_table(args.runs)
    print(table)
    if not args.no_append:
        append_benchmarks(
            "Simulator against `prfaas demo`, with the demo's calibration phase (issue 20)",
            table,
            notes="each run replayed from its own planner.yaml, router.yaml and report.json (send times, the "
            "router's prompt and prefix lengths, the calibration phase's per-route times, the router's threshold "
            "timeline); runs without a busy or pair calibration phase (made before they existed) draw those "
            "requests from the spread they have; 'idle profile' rows use the engines' prefill profile instead of the calibration; "
            "simulated figures are means over 50 seeds; see docs/simulator.md"
            + (f"; {args.notes}" if args.notes else ""),
        )


if __name__ == "__main__":
    main()
