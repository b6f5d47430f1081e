"""Reliability report (issue 8): faults injected on the KV path, requests that survived, requests
that failed cleanly, and leaks (must be 0). Prints the table and appends it to BENCHMARKS.md.

    python bench/reliability.py [--requests 8] [--mib 4] [--no-append]
"""

from __future__ import annotations

import argparse

from _common import append_benchmarks

from prfaas_plugin.faults.matrix import default_cases, run_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--mib", type=int, default=4, help="bytes per request, MiB")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    nbytes = args.mib << 20
    rows = []
    for case in default_cases(nbytes):
        r = run_case(case, requests=args.requests, request_bytes=nbytes)
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.error_types.items())) or "-"
        rows.append(f"| transfer engine | {r.case} | {r.injected} | {r.survived} | {r.failed_cleanly} | "
                    f"{r.wrong_data + r.hung + len(r.untyped_errors)} | {len(r.leaks)} | "
                    f"{'yes' if r.recovered else 'NO'} | {r.max_resolve_s:.2f} / {case.deadline_s:.0f} | {errs} |")
    table = "\n".join([
        "| path | fault | requests | survived (exact) | failed cleanly | wrong/hung/untyped | leaks | recovered | slowest resolve s / deadline | typed errors (both sides) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if not args.no_append:
        append_benchmarks("Reliability: faults on the KV path (issue 8)", table,
                          notes=f"{args.requests} concurrent requests of {args.mib} MiB per fault, fault proxy on the data plane")


if __name__ == "__main__":
    main()
