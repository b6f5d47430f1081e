"""The simulator against real `prfaas demo` runs (issue 20): each run's measured profiles
(planner.yaml), link, router threshold settings and the requests it sent (report.json: send
time, prompt and uncached tokens) are replayed in `prfaas simulate`; TTFT median and P90 per
route, simulated against measured.

python bench/sim_validate.py out/demo-val1 out/demo-val2 ... [--no-append]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from _common import append_benchmarks

from prfaas_plugin.sim.config import load_simulation
from prfaas_plugin.sim.model import Deployment, simulate_deployment
from prfaas_plugin.sim.workload import make_requests


def contention_factor(run: Path) -> float:
    """Median of (remote prefill time the demo measured per request) / (the idle profile's
    T_prefill at that length): how much slower prefill ran under the demo's load."""
    from prfaas_plugin.planner import load_config

    cfg, _ = load_config(run / "planner.yaml")
    prof = cfg.profile(cfg.deployment.prfaas_profile)
    report = json.loads((run / "report.json").read_text())
    ratios = [
        r["remote_prefill_s"] / prof.prefill_s(r["uncached_tokens"])
        for r in report["requests"]
        if r["route"] == "prfaas" and r.get("remote_prefill_s") and r["error"] is None
    ]
    return float(np.median(ratios)) if ratios else 1.0


def replay(run: Path, factor: float = 1.0) -> dict:
    report = json.loads((run / "report.json").read_text())
    router = yaml.safe_load((run / "router.yaml").read_text())
    th = router["threshold"]
    reqs = [r for r in report["requests"] if r["error"] is None]
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        trace.write_text(
            "\n".join(
                json.dumps(
                    {
                        "t": r["started_at_s"],
                        "prompt_tokens": r["prompt_tokens"],
                        "cached_tokens": max(0, r["prompt_tokens"] - r["uncached_tokens"]),
                        "prefix": "demo",
                    }
                )
                for r in sorted(reqs, key=lambda r: r["started_at_s"])
            )
        )
        cfg_raw = yaml.safe_load((run / "planner.yaml").read_text())
        for prof in cfg_raw["profiles"].values():
            if "t_prefill_s" in prof:
                prof["t_prefill_s"] = [t * factor for t in prof["t_prefill_s"]]
        cfg_raw["simulation"] = {
            "duration_s": max(r["started_at_s"] for r in reqs) + 60,
            "warmup_s": 0,
            "arrivals": {"kind": "trace", "trace": str(trace)},
            "block_tokens": router.get("block_size", 16),
            "link_rtt_ms": report["link"]["rtt_ms"],
            "start_threshold": th["tokens"],
            "controller": {
                "reoptimize_every_s": th.get("reoptimize_every_s", 10.0),
                "min_samples": th.get("min_samples", 32),
                "egress_window_s": th.get("egress_window_s", 10.0),
                "apply_split": False,
            },
            "bin_s": 1.0,
        }
        path = Path(tmp) / "planner.yaml"
        path.write_text(yaml.safe_dump(cfg_raw))
        cfg, sim, base = load_simulation(path)
        requests = make_requests(sim, cfg.length_distribution(base), base)
        dep = Deployment("demo", 1, 0, 0, "online" if th["mode"] == "auto" else "fixed", th["tokens"], n_both=1)
        res = simulate_deployment(dep, cfg, sim, requests)
    out = {}
    for route in ("prfaas", "local"):
        meas = np.array([r["ttft_s"] for r in reqs if r["route"] == route])
        simv = res.ttft_by_route[route]
        out[route] = {
            "n_meas": len(meas),
            "n_sim": len(simv),
            "meas": (float(np.median(meas)), float(np.percentile(meas, 90))) if len(meas) else None,
            "sim": (float(np.median(simv)), float(np.percentile(simv, 90))) if len(simv) else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    rows = [
        "| demo run | prefill times | route | requests measured / simulated | TTFT median measured / simulated (error) "
        "| TTFT P90 measured / simulated (error) |",
        "|---|---|---|---|---|---|",
    ]
    for run in args.runs:
        for label, factor in (("idle profile", 1.0), ("x in-run factor", contention_factor(run))):
            if factor != 1.0:
                label = f"x {factor:.1f} (in-run)"
            for route, v in replay(run, factor).items():
                if not v["meas"] or not v["sim"]:
                    rows.append(f"| {run.name} | {label} | {route} | {v['n_meas']} / {v['n_sim']} | - | - |")
                    continue
                (m50, m90), (s50, s90) = v["meas"], v["sim"]
                rows.append(
                    f"| {run.name} | {label} | {route} | {v['n_meas']} / {v['n_sim']} | {m50 * 1e3:.0f} / {s50 * 1e3:.0f} ms "
                    f"({(s50 - m50) / m50:+.0%}) | {m90 * 1e3:.0f} / {s90 * 1e3:.0f} ms ({(s90 - m90) / m90:+.0%}) |"
                )
    table = "\n".join(rows)
    print(table)
    if not args.no_append:
        append_benchmarks(
            "Simulator against `prfaas demo` (issue 20)",
            table,
            notes="each demo run replayed from its own planner.yaml (profiles measured on the idle engines), "
            "router.yaml and report.json (send times, prompt and uncached tokens); see docs/simulator.md",
        )


if __name__ == "__main__":
    main()
