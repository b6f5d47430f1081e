"""`prfaas simulate` on the paper's case study (issue 20): wall time for one simulated hour per
deployment (target < 60 s here), TTFT beside the paper's Table 6 figures, saturated throughput
and egress against the planner, and three scenarios beyond the paper with their plots.

python bench/simulate.py [--no-append] [--figures docs/figures/simulator]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from _common import ROOT, append_benchmarks

from prfaas_plugin.sim.config import load_simulation
from prfaas_plugin.sim.run import LABELS, planned_rates, run_all, write_plots

CASE = ROOT / "examples" / "planner" / "case_study.yaml"
PAPER = {"prfaas_pd": (2.22, 3.51), "homogeneous": (4.44, 9.73), "naive": (1.74, 3.51)}


def _run(**over):
    cfg, sim, base = load_simulation(CASE, {f"simulation.{k}": v for k, v in over.items()})
    t0 = time.perf_counter()
    result, runs = run_all(cfg, sim, base)
    return result, runs, sim, time.perf_counter() - t0


def recovery(r, start: float, end: float, window: float = 30.0) -> tuple[float, float]:
    """(TTFT P99 of requests arriving in [start, end + 300 s), seconds after ``end`` until the
    mean TTFT of a ``window``-long arrival window is back within 25% of the mean before ``start``)."""
    a, t = r.ttft_arrival, r.ttft
    before = t[(a < start) & (a >= start - 600)]
    during = t[(a >= start) & (a < end + 300)]
    base = float(np.mean(before)) if len(before) else float("nan")
    rec = float("nan")
    for w0 in np.arange(end, a.max() - window, 5.0):
        sel = t[(a >= w0) & (a < w0 + window)]
        if len(sel) and np.mean(sel) <= 1.25 * base:
            rec = float(w0 - end)
            break
    return (float(np.percentile(during, 99)) if len(during) else float("nan")), rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures" / "simulator")
    args = ap.parse_args()
    out = ROOT / "out" / "sim-bench"
    parts = []

    result, runs, sim, wall = _run()
    rate = sim.arrivals.rate
    rows = [
        f"Case study (examples/planner/case_study.yaml), Poisson {rate:g} req/s, {sim.duration_s:g} simulated s per "
        f"deployment ({sim.warmup_s:g} s warm-up), {len(runs)} deployments in **{wall:.1f} s** wall (target < 60 s):",
        "",
        "| deployment | throughput req/s | offload | egress Gbit/s | TTFT mean / P90 / P99 s | paper mean / P90 s |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in runs.items():
        s = r.summary()["ttft"]
        paper = PAPER.get(k.replace("_online", ""), None)
        rows.append(
            f"| {LABELS[k]} | {r.throughput_rps:.2f} | {r.offload_share:.1%} | {r.egress_gbps:.2f} | "
            f"{s['mean_s']:.2f} / {s['p90_s']:.2f} / {s['p99_s']:.2f} | "
            f"{f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '-'} |"
        )
    write_plots(runs, sim, out / "case")
    _r, low, _s, wall_low = _run(arrivals={"kind": "poisson", "rate": 1.5})
    rows += ["", f"The same at Poisson 1.5 req/s ({wall_low:.1f} s wall):", "", rows[2], rows[3]]
    for k, r in low.items():
        s = r.summary()["ttft"]
        paper = PAPER.get(k.replace("_online", ""), None)
        rows.append(
            f"| {LABELS[k]} | {r.throughput_rps:.2f} | {r.offload_share:.1%} | {r.egress_gbps:.2f} | "
            f"{s['mean_s']:.2f} / {s['p90_s']:.2f} / {s['p99_s']:.2f} | "
            f"{f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '-'} |"
        )
    parts.append("\n".join(rows))

    result, runs, sim, wall = _run(duration_s=1800, queue_high=10**6, arrivals={"kind": "poisson", "rate": 5.0})
    planned = planned_rates(result)
    rows = [
        f"Saturation: Poisson 5 req/s (above every Lambda_max), overload fallback off, 1800 s ({wall:.1f} s wall):",
        "",
        "| deployment | throughput req/s sim / plan (error) | egress Gbit/s sim / plan (error) |",
        "|---|---|---|",
    ]
    for k, r in runs.items():
        lam, eg = planned[k]
        e = f"{r.egress_gbps:.2f} / {eg:.2f} ({(r.egress_gbps - eg) / eg:+.1%})" if eg else "0 / 0"
        rows.append(
            f"| {LABELS[k]} | {r.throughput_rps:.2f} / {lam:.2f} ({(r.throughput_rps - lam) / lam:+.1%}) | {e} |"
        )
    parts.append("\n".join(rows))

    two = ["prfaas_pd", "prfaas_pd_online"]
    scen = {
        "dip20": (
            "link 100 -> 20 Gbit/s for 5 min at 10 min",
            600,
            900,
            {"link_trace": [{"at_s": 600, "gbps": 20}, {"at_s": 900, "gbps": 100}]},
        ),
        "dip5": (
            "link 100 -> 5 Gbit/s for 5 min at 10 min",
            600,
            900,
            {"link_trace": [{"at_s": 600, "gbps": 5}, {"at_s": 900, "gbps": 100}]},
        ),
        "burst": (
            "3x burst (6 req/s) for 2 min at 10 min",
            600,
            720,
            {"arrivals": {"kind": "poisson", "rate": 2.0, "changes": [{"at_s": 600, "duration_s": 120, "factor": 3}]}},
        ),
        "skew": (
            "60% of requests read one of 10 documents of 100K tokens (Zipf 1.2)",
            0,
            0,
            {"prefix": {"share": 0.6, "documents": 10, "doc_tokens": 100000, "zipf_s": 1.2}},
        ),
    }
    rows = [
        "Scenarios beyond the paper (Poisson 2 req/s unless stated, 1800 s, 300 s warm-up):",
        "",
        "| scenario | deployment | TTFT mean / P99 s (whole run) | P99 s from the event to 5 min after | recovery s | offload | cached share | egress Gbit/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, (title, start, end, over) in scen.items():
        _res, runs, sim, wall = _run(duration_s=1800, deployments=two, **over)
        for k, r in runs.items():
            s = r.summary()["ttft"]
            p99, rec = recovery(r, start, end) if end else (float("nan"), float("nan"))
            rows.append(
                f"| {title} | {LABELS[k]} | {s['mean_s']:.2f} / {s['p99_s']:.2f} | "
                f"{'-' if np.isnan(p99) else f'{p99:.2f}'} | {'-' if np.isnan(rec) else f'{rec:.0f}'} | "
                f"{r.offload_share:.1%} | {r.cached_share:.1%} | {r.egress_gbps:.2f} |"
            )
        write_plots(runs, sim, out / key)
    parts.append("\n".join(rows))

    args.figures.mkdir(parents=True, exist_ok=True)
    keep = [
        ("case", "ttft_cdf"),
        ("case", "egress"),
        ("dip5", "offload_threshold"),
        ("dip5", "egress"),
        ("burst", "queues"),
        ("burst", "offload_threshold"),
        ("skew", "offload_threshold"),
    ]
    figs = []
    for d, name in keep:
        dst = args.figures / f"{d}_{name}.png"
        shutil.copy(out / d / f"{name}.png", dst)
        figs.append(f"![{d} {name}]({dst.relative_to(ROOT)})")
    body = "\n\n".join(parts) + "\n\nFigures:\n\n" + "\n".join(figs)
    print(body)
    if not args.no_append:
        append_benchmarks(
            "Simulator: case study, saturation, scenarios (issue 20)",
            body,
            notes="model and sources in docs/simulator.md",
        )


if __name__ == "__main__":
    main()
