"""Planner speed (issue 2 target: the case study in under 1 s here) and its Table 6 figures.

python bench/planner.py [--repeat 5] [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import ROOT, append_benchmarks

from prfaas_plugin.planner import load_config, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    case = ROOT / "examples" / "planner" / "case_study.yaml"
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        cfg, base = load_config(case)
        r = plan(cfg.system(), cfg.length_distribution(base), cfg.search.threshold_step, with_curves=True)
        times.append(time.perf_counter() - t0)
    d = r.to_dict()
    table = "\n".join(
        [
            "| figure | ours | paper (Table 6) |",
            "|---|---|---|",
            f"| case-study plan time (load + search + Fig. 5 curves), median of {args.repeat} | {statistics.median(times) * 1e3:.0f} ms | target < 1 s |",
            f"| threshold t | {d['threshold_tokens'] / 1000:.1f}K | 19.4K |",
            f"| offloaded fraction p | {d['offload_fraction'] * 100:.1f}% | 49.6% |",
            f"| N_prfaas / N_p / N_d | {d['n_prfaas']} / {d['n_pd_prefill']} / {d['n_pd_decode']} | 4 / 3 / 5 |",
            f"| Lambda_max PrfaaS-PD / homogeneous / naive | {d['lambda_max']:.2f} / {d['baselines']['homogeneous']['lambda_max']:.2f} / "
            f"{d['baselines']['naive_heterogeneous']['lambda_max']:.2f} req/s | 3.24 / 2.11 / 2.45 |",
            f"| ratios vs homogeneous | {d['ratios']['vs_homogeneous']:.2f}x / {d['ratios']['naive_vs_homogeneous']:.2f}x | 1.54x / 1.16x |",
            f"| egress | {d['egress_gbps']:.1f} Gbit/s | ~13 Gbit/s |",
        ]
    )
    print(table)
    if not args.no_append:
        append_benchmarks(
            "Planner: case study (issue 2)",
            table,
            notes="H20 profile derived (compute ratio 3.1, fixed ratio 1.2), see examples/planner/case_study.yaml",
        )


if __name__ == "__main__":
    main()
